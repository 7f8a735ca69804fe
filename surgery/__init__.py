"""Model surgery for transfer learning on ``torch.fx`` graphs: DL4J's TransferLearning,
FineTuneConfiguration and TransferLearningHelper, plus summary and save/load."""

from . import edits, layers, losses, specs, training, vertices, zoo
from .builder import TransferLearning
from .finetune import FineTuneConfiguration
from .fingerprint import fingerprint, frozen_fingerprint
from .freeze import freeze_, is_frozen, unfreeze_
from .graph import ShapeError, VertexError, vertex_names
from .helper import Split, TransferLearningHelper, split
from .objective import LossSpec, loss_specs, objective
from .preprocess import PreprocessConfig
from .recipe import ModelInfo, get_info
from .serialize import load, recipe_of, save
from .summary import Summary, summary
from .weights import WeightsError

__all__ = [
    "edits",
    "layers",
    "losses",
    "specs",
    "training",
    "vertices",
    "zoo",
    "TransferLearning",
    "FineTuneConfiguration",
    "TransferLearningHelper",
    "PreprocessConfig",
    "ModelInfo",
    "Split",
    "Summary",
    "LossSpec",
    "ShapeError",
    "VertexError",
    "WeightsError",
    "fingerprint",
    "frozen_fingerprint",
    "freeze_",
    "unfreeze_",
    "is_frozen",
    "get_info",
    "load",
    "save",
    "recipe_of",
    "split",
    "summary",
    "loss_specs",
    "objective",
    "vertex_names",
]
