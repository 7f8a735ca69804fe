"""Ray Data and Ray Train for transfer learning: image sources, featurization, feature
sets, head training, fine-tuning, evaluation and prediction."""

from .evaluate import EvalResult, PredictResult, Scorer, evaluate, predict
from .features import FeatureMismatch, FeatureSet
from .featurize import Featurizer, featurize
from .lease import LeaseHeld, LeaseLost
from .sources import ImageSource, read_images
from .finetune import finetune
from .sweep import SweepResult, sweep
from .train import FitResult, fit_head

__all__ = [
    "EvalResult",
    "FeatureMismatch",
    "FeatureSet",
    "Featurizer",
    "FitResult",
    "ImageSource",
    "LeaseHeld",
    "LeaseLost",
    "PredictResult",
    "Scorer",
    "SweepResult",
    "evaluate",
    "featurize",
    "finetune",
    "fit_head",
    "predict",
    "read_images",
    "sweep",
]
