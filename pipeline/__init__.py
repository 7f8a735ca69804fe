"""Ray Data and Ray Train for transfer learning: image sources, featurization, feature
sets, head training, fine-tuning, evaluation and prediction.

The names are imported on first use (see :mod:`freezeray.lazy`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from freezeray.lazy import lazy_package

# name -> the submodule that defines it (None: the name is a submodule)
_EXPORTS: dict[str, str | None] = {
    "Batches": "options",
    "Run": "options",
    "Stopping": "options",
    "Tuning": "options",
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
    "RunMismatch": "runs",
    "set_verbose": "runtime",
    "ImageSource": "sources",
    "read_images": "sources",
    "Stage": "stages",
    "SweepResult": "sweep",
    "sweep": "sweep",
    "FitResult": "train",
}

__all__ = lazy_package(__name__, _EXPORTS)

if TYPE_CHECKING:  # what type checkers and IDEs see
    from .evaluate import EvalResult, Scorer, evaluate
    from .features import FeatureMismatch, FeatureSet
    from .featurize import Featurizer, featurize
    from .finetune import finetune
    from .head import fit_head
    from .lease import LeaseHeld, LeaseLost
    from .options import Batches, Run, Stopping, Tuning
    from .predict import PredictResult, predict
    from .resources import Resources
    from .runs import RunMismatch
    from .runtime import set_verbose
    from .sources import ImageSource, read_images
    from .stages import Stage
    from .sweep import SweepResult, sweep
    from .train import FitResult
