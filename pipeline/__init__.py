"""Ray Data and Ray Train for transfer learning: image sources, featurization, feature
sets, head training, fine-tuning, evaluation and prediction.

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
    "EvalResult": "evaluate",
    "Scorer": "evaluate",
    "evaluate": "evaluate",
    "FeatureMismatch": "features",
    "FeatureSet": "features",
    "Featurizer": "featurize",
    "featurize": "featurize",
    "finetune": "finetune",
    "fit_head": "head",
    "LeaseHeld": "lease",
    "LeaseLost": "lease",
    "PredictResult": "predict",
    "predict": "predict",
    "Resources": "resources",
    "ImageSource": "sources",
    "read_images": "sources",
    "Stage": "stages",
    "SweepResult": "sweep",
    "sweep": "sweep",
    "FitResult": "train",
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
    from .evaluate import EvalResult, Scorer, evaluate
    from .features import FeatureMismatch, FeatureSet
    from .featurize import Featurizer, featurize
    from .finetune import finetune
    from .head import fit_head
    from .lease import LeaseHeld, LeaseLost
    from .predict import PredictResult, predict
    from .resources import Resources
    from .sources import ImageSource, read_images
    from .stages import Stage
    from .sweep import SweepResult, sweep
    from .train import FitResult
