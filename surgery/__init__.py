"""Model surgery for transfer learning on ``torch.fx`` graphs: DL4J's TransferLearning,
FineTuneConfiguration and TransferLearningHelper, plus summary and save/load.

The names are imported on first use (see :mod:`freezeray.lazy`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from freezeray.lazy import lazy_package

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
    "FineTuneConfiguration": "surgery.training.config",
    "fingerprint": "fingerprint",
    "frozen_fingerprint": "fingerprint",
    "probe": "fingerprint",
    "ProbeMismatch": "fingerprint",
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
    "LossSpec": "surgery.training.objective",
    "loss_specs": "surgery.training.objective",
    "objective": "surgery.training.objective",
    "PreprocessConfig": "freezeray.images",
    "ModelInfo": "recipe",
    "get_info": "recipe",
    "load": "serialize",
    "recipe_of": "serialize",
    "save": "serialize",
    "SchemaError": "freezeray.schema",
    "Summary": "summary",
    "summary": "summary",
    "WeightsError": "weights",
}

__all__ = lazy_package(__name__, _EXPORTS)

if TYPE_CHECKING:  # what type checkers and IDEs see
    from freezeray.images import PreprocessConfig
    from freezeray.schema import SchemaError

    from . import edits, layers, losses, specs, training, vertices, zoo
    from .builder import TransferLearning
    from .fingerprint import ProbeMismatch, fingerprint, frozen_fingerprint, probe
    from .freeze import freeze_, is_frozen, unfreeze_
    from .graph import ShapeError, VertexError, vertex_names
    from .helper import Split, TransferLearningHelper, split
    from .modules import TraceFailure, from_module
    from .onnx_import import UnsupportedOnnx, import_onnx
    from .recipe import ModelInfo, get_info
    from .serialize import load, recipe_of, save
    from .summary import Summary, summary
    from .training.config import FineTuneConfiguration
    from .training.objective import LossSpec, loss_specs, objective
    from .weights import WeightsError
