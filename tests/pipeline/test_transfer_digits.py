"""Transfer works on real data: efficientnet_lite0's ImageNet features of scikit-learn's
handwritten digits train a 10-class head to high held-out accuracy; the same recipe on
random weights scores far lower."""

import pytest

import surgery
from jobs.demo import write_digits
from pipeline import featurize, fit_head
from surgery import FineTuneConfiguration, TransferLearning
from surgery.layers import Output


def _held_out_accuracy(weights, root, tmp_path):
    base = surgery.zoo.load("efficientnet_lite0", weights=weights)
    model = (TransferLearning(base).fine_tune_configuration(FineTuneConfiguration(updater="adam", lr=3e-3, seed=0))
             .set_feature_extractor("global_pool").remove_vertex_keep_connections("classifier")
             .add_layer("classifier", Output(10, loss="cross_entropy")).build())
    features = featurize(model, root, str(tmp_path / f"features-{weights}"), image_size=96)
    assert features.rows == 1797 and features.errors == 0
    result = fit_head(model, features, validation=0.25, epochs=5, batch_size=64, num_workers=2,
                      storage=str(tmp_path / "runs"))
    return result.history[-1]["val_accuracy"], result.history[-1]["val_rows"]


@pytest.mark.slow
def test_imagenet_features_transfer_to_digits_and_random_weights_do_not(ray_session, tmp_path):
    root = tmp_path / "digits"
    write_digits(str(root))
    # one manifest over both splits of the writer; fit_head holds out a seeded quarter of it
    files = sorted(root.glob("*/*/*.png"))
    (root / "all.csv").write_text("path,label\n" + "".join(f"{f.relative_to(root)},{f.parent.name}\n" for f in files))
    imagenet, rows = _held_out_accuracy("imagenet", str(root / "all.csv"), tmp_path)
    random, _ = _held_out_accuracy(None, str(root / "all.csv"), tmp_path)
    assert 380 <= rows <= 520  # about a quarter of 1,797 held out
    assert imagenet >= 0.90
    assert random <= imagenet - 0.15, (imagenet, random)
