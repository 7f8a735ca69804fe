"""Ray Data and Ray Train for transfer learning: image sources, featurization, feature
sets, head training, fine-tuning, evaluation and prediction."""

from .features import FeatureMismatch, FeatureSet
from .featurize import Featurizer, featurize
from .sources import ImageSource, read_images

__all__ = ["FeatureMismatch", "FeatureSet", "Featurizer", "ImageSource", "featurize", "read_images"]
