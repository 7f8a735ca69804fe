"""One error hierarchy (:mod:`freezeray.errors`): every exception class the packages define
derives from one of its four kinds, and the CLI picks exit codes by class, never by a
class's name."""

import ast
import builtins
import pathlib

import pytest

from freezeray.errors import DataUnavailable, FreezerayError, InvalidInput, OutputBusy, OutputConflict
from jobs.cli import classify

ROOT = pathlib.Path(__file__).resolve().parents[1]
KINDS = {"InvalidInput", "DataUnavailable", "OutputBusy", "OutputConflict"}
# exception classes that are not failures a user sees, and why
EXEMPT = {"CliError": "the CLI's rendering of a failure (its code comes from the error it renders)",
          "Cut": "control flow inside a reader, never raised out of it"}


def _exception_classes() -> dict[str, tuple[str, list[str]]]:
    """name -> (module path, base names) of every class in the packages that derives,
    directly or through another such class, from a built-in exception."""
    classes = {}
    for package in ("freezeray", "surgery", "pipeline", "jobs"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef):
                    classes[node.name] = (str(path.relative_to(ROOT)), [ast.unparse(b).split(".")[-1] for b in node.bases])
    builtin = {n for n in dir(builtins) if isinstance(getattr(builtins, n), type) and issubclass(getattr(builtins, n), BaseException)}

    def is_exception(name: str, seen: frozenset = frozenset()) -> bool:
        if name in builtin:
            return True
        if name not in classes or name in seen:
            return False
        return any(is_exception(b, seen | {name}) for b in classes[name][1])

    return {n: v for n, v in classes.items() if n not in builtin and is_exception(n)}


def test_every_error_class_derives_from_one_of_the_four_kinds():
    classes = _exception_classes()

    def kind_of(name: str) -> str | None:
        if name in KINDS:
            return name
        return next((k for b in classes.get(name, ("", []))[1] if (k := kind_of(b))), None)

    assert {"LeaseHeld", "StorageUnavailable", "FeatureMismatch", "VertexError", "WeightsError", "RunMismatch"} <= set(classes)
    stray = {n: path for n, (path, _) in classes.items()
             if n not in EXEMPT and n != "FreezerayError" and n not in KINDS and kind_of(n) is None}
    assert not stray, f"exception classes outside freezeray.errors' hierarchy: {stray}"


@pytest.mark.parametrize("make, code", [
    (lambda: __import__("pipeline.lease", fromlist=["x"]).LeaseHeld("another job writes it"), 4),
    (lambda: __import__("pipeline.lease", fromlist=["x"]).LeaseLost("taken over"), 4),
    (lambda: __import__("freezeray.storage", fromlist=["x"]).StorageUnavailable("down for 120 s"), 3),
    (lambda: __import__("pipeline.checkpoints", fromlist=["x"]).CheckpointError("partial"), 3),
    (lambda: __import__("pipeline.features", fromlist=["x"]).FeatureMismatch("another graph"), 5),
    (lambda: __import__("surgery.graph", fromlist=["x"]).VertexError("'fc9' is not in the graph"), 2),
    (lambda: __import__("surgery.weights", fromlist=["x"]).WeightsError("not a weights file"), 2),
    (lambda: FileNotFoundError("no such folder"), 3),
    (lambda: FileExistsError("holds predictions"), 5),
])
def test_the_cli_maps_each_error_to_its_class_exit_code(make, code):
    exc = make()
    assert isinstance(exc, FreezerayError) == (not isinstance(exc, OSError) or isinstance(exc, DataUnavailable))
    assert classify(exc).code == code
    try:  # the same error as the cause of another, as Ray and the steps raise it
        raise RuntimeError("the step failed") from exc
    except RuntimeError as outer:
        assert classify(outer).code == code


def test_the_cli_maps_by_class_not_by_name():
    class Busy(OutputBusy, RuntimeError):  # a new class of a kind: its kind's code, whatever its name
        pass

    class LeaseHeld(RuntimeError):  # a stranger with a known name: not one of ours
        pass

    assert classify(Busy("x")).code == OutputBusy.exit_code == 4
    assert classify(LeaseHeld("x")) is None
    assert classify(type("Conflict", (OutputConflict, ValueError), {})("x")).code == 5
    assert classify(type("Missing", (DataUnavailable, RuntimeError), {})("x")).code == 3
    assert classify(type("Bad", (InvalidInput, RuntimeError), {})("x")).code == 2


def test_a_run_name_taken_names_its_config_key():
    from pipeline.runs import RunMismatch

    err = classify(RunMismatch("head", "/runs", [("epochs", 10, 20)]))
    assert err.code == 2 and err.message.startswith("training.run_name: run 'head' at /runs was started with another")
    assert "set training.run_name to another name" in err.message
