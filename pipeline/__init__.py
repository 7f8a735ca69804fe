"""Ray Data and Ray Train for transfer learning: image sources, featurization, feature
sets, head training, fine-tuning, evaluation and prediction."""
