"""ARCHITECTURE.md's code map matches the tree: every module of a package is named in its
package's section and every name there is a module, and no package imports what its
section says it never imports (at module level or inside a function)."""

import ast
import pathlib
import re
import subprocess
import sys

from test_structure import _import_nodes

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / "ARCHITECTURE.md"
PACKAGES = ("freezeray", "surgery", "pipeline", "jobs")


def _sections() -> dict[str, str]:
    text = DOC.read_text()
    found = {}
    for package in PACKAGES:
        m = re.search(rf"^### {package}/\n(.*?)(?=^##)", text, re.S | re.M)
        assert m, f"ARCHITECTURE.md has no '### {package}/' section"
        found[package] = m.group(1)
    return found


def _modules(package: str) -> set[str]:
    base = ROOT / package
    return {str(p.relative_to(base)) for p in base.rglob("*.py") if p.name != "__init__.py"}


def _imported_tops(path: pathlib.Path) -> set[str]:
    """Top-level names of everything a module imports, anywhere in it (relative imports
    stay inside their package and are left out)."""
    tops: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text()), deep=True):
        if isinstance(node, ast.Import):
            tops.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            tops.add(node.module.split(".")[0])
    return tops


def test_the_code_map_names_every_module_and_only_modules():
    for package, section in _sections().items():
        named = set(re.findall(r"`([\w/]+\.py)`", section))
        actual = _modules(package)
        assert not actual - named, f"ARCHITECTURE.md's {package}/ section does not name {sorted(actual - named)}"
        assert not named - actual, f"ARCHITECTURE.md's {package}/ section names {sorted(named - actual)}, not in the tree"


def test_no_package_imports_what_its_section_forbids():
    checked = 0
    for package, section in _sections().items():
        m = re.search(r"^Never imports: (.+)\.$", section, re.M)
        assert m, f"ARCHITECTURE.md's {package}/ section has no 'Never imports:' line"
        forbidden = {name.strip() for name in m.group(1).split(",")}
        assert forbidden and package not in forbidden
        for path in sorted((ROOT / package).rglob("*.py")):
            bad = _imported_tops(path) & forbidden
            assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}, which ARCHITECTURE.md forbids for {package}/"
            checked += 1
    assert checked > 60  # every module was read
    assert "ray" in _imported_tops(ROOT / "pipeline" / "runtime.py")  # the walk sees imports inside functions too


def test_the_base_floor_loads_without_torch_or_ray():
    """What a read task imports to decode images and touch storage costs neither torch nor
    Ray (1.2 s and more per new worker process on 2 cores)."""
    code = ("import sys, freezeray.errors, freezeray.images, freezeray.lazy, freezeray.schema, freezeray.storage; "
            "print(sorted(m for m in ('torch', 'ray', 'surgery', 'pipeline', 'jobs') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]", out
