"""Ray Data and Ray Train for transfer learning: image sources, featurization, feature
sets, head training, fine-tuning, evaluation and prediction."""

from .evaluate import EvalResult, Scorer, evaluate
from .features import FeatureMismatch, FeatureSet
from .featurize import Featurizer, featurize
from .finetune import finetune
from .head import fit_head
from .lease import LeaseHeld, LeaseLost
from .predict import PredictResult, predict
from .resources import Resources
from .sources import ImageSource, read_images
from .sweep import SweepResult, sweep
from .train import FitResult

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
    "Resources",
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
