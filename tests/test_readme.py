"""The README stays true: every public name its Python examples use exists and takes the
keyword arguments they pass, every `freezeray` command it shows is one, every `make`
target exists, and every repository path it names is there."""

import ast
import importlib
import inspect
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PACKAGES = {"surgery", "pipeline"}


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def _resolve(dotted: str):
    head, *rest = dotted.split(".")
    obj = importlib.import_module(head)
    for part in rest:
        obj = getattr(obj, part)
    return obj


def _imported_names(tree: ast.AST) -> dict[str, str]:
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _calls():
    for block in _python_blocks():
        tree = ast.parse(block)
        imported = _imported_names(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            dotted = _dotted(node.func)
            if dotted is None:
                continue
            head = dotted.split(".")[0]
            if head in imported:
                dotted = imported[head] + dotted[len(head):]
            if dotted.split(".")[0] in PACKAGES:
                yield dotted, [k.arg for k in node.keywords if k.arg]


def test_readme_python_examples_parse_and_import():
    blocks = _python_blocks()
    assert len(blocks) >= 4
    for block in blocks:
        for name, target in _imported_names(ast.parse(block)).items():
            module, _, attr = target.rpartition(".")
            assert hasattr(importlib.import_module(module), attr), target


def test_every_public_call_in_the_readme_exists_with_its_keywords():
    calls = list(_calls())
    assert len(calls) >= 10
    for dotted, keywords in calls:
        obj = _resolve(dotted)
        assert callable(obj), dotted
        try:
            params = inspect.signature(obj).parameters
        except (TypeError, ValueError):
            continue
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            continue
        unknown = [k for k in keywords if k not in params]
        assert not unknown, f"{dotted} takes no {unknown}"


def test_builder_methods_in_the_readme_exist():
    from surgery import TransferLearning

    used = set(re.findall(r"^\s*\.(\w+)\(", README, flags=re.M))
    assert {"set_feature_extractor", "n_out_replace", "add_layer", "build"} <= used
    missing = [m for m in used if not hasattr(TransferLearning, m)]
    assert not missing, missing


def test_cli_commands_make_targets_and_paths_in_the_readme_exist():
    import argparse

    from jobs.cli import _parser

    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    commands = set(sub.choices)
    code = "\n".join(re.findall(r"```\w*\n(.*?)```", README, flags=re.S))
    shown = {c for group in re.findall(r"^freezeray ([\w|]+)", code, flags=re.M) for c in group.split("|")}
    assert shown and shown <= commands, shown - commands
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
    assert set(re.findall(r"`make ([\w-]+)", README)) | set(re.findall(r"^make ([\w-]+)", README, re.M)) <= targets
    for path in re.findall(r"`((?:jobs|surgery|pipeline|tests|benchmarks)/[\w/.-]+)`", README):
        assert (ROOT / path).exists(), path


@pytest.mark.parametrize("name", ["vgg16", "efficientnet_lite0", "resnet50", "timm/convnext_tiny"])
def test_zoo_names_in_the_readme_are_known(name):
    import surgery

    assert name in README
    surgery.zoo.skeleton(name)


_TOUR = '''
import pathlib, sys
import models  # noqa: F401  (registers tiny_cnn_test)
from imagesets import write_folder

import surgery, pipeline
from surgery import TransferLearning, FineTuneConfiguration
from surgery.layers import Dense, Output

root = pathlib.Path(sys.argv[1])
write_folder(root / "train", per_class=10, size=20, seed=1, odd_modes=False)
write_folder(root / "test", per_class=4, size=20, seed=2, odd_modes=False)
base = surgery.zoo.load("tiny_cnn_test")
model = (TransferLearning(base)
         .fine_tune_configuration(FineTuneConfiguration(updater="nesterov", lr=5e-3, seed=123))
         .set_feature_extractor("flatten")
         .n_out_replace("fc1", 16, weight_init="xavier")
         .remove_vertex_and_connections("fc2")
         .add_layer("fc3", Dense(8, activation="tanh"), "fc1")
         .add_layer("newpredictions", Output(3, loss="nll"), "fc3")
         .set_outputs("newpredictions")
         .build())
features = pipeline.featurize(model, str(root / "train"), str(root / "features"))
result = pipeline.fit_head(model, features, stopping=pipeline.Stopping(epochs=3),
                           run=pipeline.Run(storage=str(root / "runs"), name="tour"))
print(result.best_epoch, result.metrics)
print(pipeline.evaluate(result.model, str(root / "test")).table())
surgery.save(result.model, str(root / "model"))
'''


def test_the_tour_prints_what_it_prints_and_nothing_of_rays(tmp_path):
    """The README's tour, small (a tiny model, local folders, without its summary table),
    run as a script: it prints its own 6 lines and nothing else: none of Ray's INFO logs,
    progress lines, local-mode notices or C++ core lines (45 lines around 8 before)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "FREEZERAY_VERBOSE", "RAY_BACKEND_LOG_LEVEL")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    proc = subprocess.run([sys.executable, "-c", _TOUR, str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (proc.stdout + proc.stderr).splitlines()
    assert len(lines) <= 15, lines
    assert proc.stderr == "", proc.stderr
    best, header, *classes, totals = proc.stdout.splitlines()
    assert best.split()[0] in ("0", "1", "2") and header.startswith("class ") and totals.startswith("accuracy ")
    assert [c.split()[0] for c in classes] == ["blue_bar", "green_square", "red_disc"]


def test_quiet_by_default_and_verbose_on_request(monkeypatch):
    import logging

    from ray.data import DataContext

    from pipeline import runtime

    ctx = DataContext.get_current()
    before = ctx.enable_progress_bars
    monkeypatch.delenv(runtime.VERBOSE_ENV, raising=False)
    monkeypatch.setattr(runtime, "_verbose", None)
    monkeypatch.setattr(runtime, "_LOUD", {})  # what an earlier quiet_ray in this process saved is not this test's
    assert not runtime.is_verbose()
    monkeypatch.setenv(runtime.VERBOSE_ENV, "1")
    assert runtime.is_verbose()
    runtime.set_verbose(False)  # the call wins over the environment
    assert not runtime.is_verbose()
    train_logger = logging.getLogger("ray.train")
    train_level = train_logger.level
    try:
        # Ray as it starts: bars on, its loggers unset; what set_verbose(False) saved above
        # (the state an earlier test left) is not what this test restores
        monkeypatch.setattr(runtime, "_LOUD", {})
        ctx.enable_progress_bars = True
        train_logger.setLevel(logging.NOTSET)
        runtime.quiet_ray(False)
        assert not ctx.enable_progress_bars and logging.getLogger("ray.train").level == logging.WARNING
        runtime.quiet_ray(True)  # verbose: what quiet_ray changed is put back
        assert ctx.enable_progress_bars and logging.getLogger("ray.train").level != logging.WARNING
    finally:
        runtime.quiet_ray(True)
        ctx.enable_progress_bars = before
        train_logger.setLevel(train_level)
