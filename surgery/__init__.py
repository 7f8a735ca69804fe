"""Model surgery for transfer learning on ``torch.fx`` graphs: DL4J's TransferLearning,
FineTuneConfiguration and TransferLearningHelper, plus summary and save/load.

The names are imported on first use (PEP 562): importing the package costs nothing until
then, so a Ray worker that only reads and decodes images never imports torch (1.2 s on 2
cores, paid by every new worker process).
"""

from __future__ import annotations

import sys
import types
from importlib import import_module
from typing import TYPE_CHECKING, Any

# name -> the submodule that defines it (None: the name is a submodule)
_EXPORTS: dict[str, str | None] = {
    "edits": None,
    "layers": None,
    "losses": None,
    "specs": None,
    "training": None,
    "vertices": None,
    "zoo": None,
    "TransferLearning": "builder",
    "FineTuneConfiguration": "finetune",
    "fingerprint": "fingerprint",
    "frozen_fingerprint": "fingerprint",
    "freeze_": "freeze",
    "is_frozen": "freeze",
    "unfreeze_": "freeze",
    "ShapeError": "graph",
    "VertexError": "graph",
    "vertex_names": "graph",
    "Split": "helper",
    "TransferLearningHelper": "helper",
    "split": "helper",
    "from_module": "modules",
    "TraceFailure": "modules",
    "import_onnx": "onnx_import",
    "UnsupportedOnnx": "onnx_import",
    "LossSpec": "objective",
    "loss_specs": "objective",
    "objective": "objective",
    "PreprocessConfig": "preprocess",
    "ModelInfo": "recipe",
    "get_info": "recipe",
    "load": "serialize",
    "recipe_of": "serialize",
    "save": "serialize",
    "SchemaError": "schema",
    "Summary": "summary",
    "summary": "summary",
    "WeightsError": "weights",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    where = _EXPORTS[name]
    value = import_module(f".{name}", __name__) if where is None else getattr(import_module(f".{where}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """Importing a submodule binds it on its package; where a submodule shares its name with
    the function it defines (``featurize``, ``summary``), the function keeps the name."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # what type checkers and IDEs see
    from . import edits, layers, losses, specs, training, vertices, zoo
    from .builder import TransferLearning
    from .finetune import FineTuneConfiguration
    from .fingerprint import fingerprint, frozen_fingerprint
    from .freeze import freeze_, is_frozen, unfreeze_
    from .graph import ShapeError, VertexError, vertex_names
    from .helper import Split, TransferLearningHelper, split
    from .modules import TraceFailure, from_module
    from .objective import LossSpec, loss_specs, objective
    from .onnx_import import UnsupportedOnnx, import_onnx
    from .preprocess import PreprocessConfig
    from .recipe import ModelInfo, get_info
    from .schema import SchemaError
    from .serialize import load, recipe_of, save
    from .summary import Summary, summary
    from .weights import WeightsError
