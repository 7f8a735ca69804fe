"""The codebase's shape: no import cycle among the project's modules, neither through
module-level imports nor through imports inside functions (a function-level import may
defer a cost, never hide a cycle), and no module over 550 lines."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("freezeray", "surgery", "pipeline", "jobs")
MAX_LINES = 550


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _import_nodes(tree: ast.AST, deep: bool) -> list[ast.stmt]:
    """The import statements of a module: at module level (inside ``if``/``try``/``with``
    too), and with ``deep`` everywhere else as well; ``TYPE_CHECKING`` blocks left out."""
    found: list[ast.stmt] = []
    shallow = (ast.If, ast.Try, ast.ExceptHandler, ast.With)

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for sub in child.orelse:
                    visit(ast.Module(body=[sub], type_ignores=[]))
            elif isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            elif deep or isinstance(child, shallow):
                visit(child)

    visit(tree)
    return found


def _imports(name: str, path: pathlib.Path, known: set[str], deep: bool = False) -> set[str]:
    """Project modules imported at module level (with ``deep``, inside functions too)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in _import_nodes(tree, deep):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            for alias in node.names:
                if f"{target}.{alias.name}" in known:
                    out.add(f"{target}.{alias.name}")
                elif target in known:
                    out.add(target)
    out.discard(name)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def walk(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt, stack + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name, [name])
    return cycles


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(name, path, set(modules)) for name, path in modules.items()}
    cycles = _cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
    assert {"surgery.graph", "surgery.recipe"} <= graph["surgery.summary"]  # the walk sees real imports


def test_no_import_cycles_through_function_level_imports():
    modules = _modules()
    graph = {name: _imports(name, path, set(modules), deep=True) for name, path in modules.items()}
    cycles = _cycles(graph)
    assert not cycles, "import cycles through imports inside functions: " + "; ".join(" -> ".join(c) for c in cycles)
    shallow = {name: _imports(name, path, set(modules)) for name, path in modules.items()}
    assert any(graph[m] > shallow[m] for m in graph)  # the deep walk sees the imports inside functions


def test_no_module_over_550_lines():
    long = {str(p.relative_to(ROOT)): n for p in _modules().values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long
