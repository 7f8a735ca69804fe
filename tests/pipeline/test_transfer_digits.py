"""Transfer works on real data, with defaults that converge: efficientnet_lite0's ImageNet
features of scikit-learn's handwritten digits train a 10-class head, with fit_head's
default arguments, to within a point of scikit-learn's LogisticRegression (C chosen by
cross-validation) on the same features."""

import pytest

from jobs.demo import write_digits
from pipeline import Run, evaluate, featurize, fit_head
from surgery import TransferLearning
from surgery.layers import Output


def _logistic_regression(train, test):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV

    x, y = (t.numpy() for t in train.to_tensors())
    tx, ty = (t.numpy() for t in test.to_tensors())
    search = GridSearchCV(LogisticRegression(max_iter=2000), {"C": [0.03, 0.1, 0.3, 1.0]}, cv=3).fit(x, y)
    return float(search.score(tx, ty)), search.best_params_["C"]


@pytest.mark.slow
def test_default_fit_head_is_within_a_point_of_logistic_regression(ray_session, lite0_imagenet, tmp_path):
    root = tmp_path / "digits"
    write_digits(str(root))  # the demo's seeded, stratified 75/25 split
    model = (TransferLearning(lite0_imagenet).set_feature_extractor("global_pool")
             .remove_vertex_keep_connections("classifier").add_layer("classifier", Output(10, loss="cross_entropy"))
             .build())
    train = featurize(model, str(root / "train"), str(tmp_path / "train"), image_size=96)
    test = featurize(model, str(root / "test"), str(tmp_path / "test"), image_size=96)
    assert (train.rows, test.rows, train.errors) == (1347, 450, 0)
    result = fit_head(model, train, run=Run(storage=str(tmp_path / "runs")))  # every argument left at its default
    assert result.mode == "local" and result.history[-1]["stopped_early"] and result.best_epoch >= 2
    ours = evaluate(result.model, test).accuracy
    reference, c = _logistic_regression(train, test)
    assert ours >= reference - 0.01, (ours, reference, c)
    assert ours >= 0.95
