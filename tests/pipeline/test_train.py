"""fit_head / finetune / evaluate / predict on the shared Ray session: accuracy on
generated and real data, equivalence with end-to-end training, reproducibility, and
errors before any work. Worker failures, resume by name and bad checkpoints are in
tests/reliability/test_train_faults.py."""

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import pipeline
import surgery
from imagesets import bad_files, write_image_folder
from pipeline import FeatureMismatch, evaluate, featurize, finetune, fit_head, predict, read_images
from surgery import FineTuneConfiguration, TransferLearning
from surgery.layers import Dense, Output, emit_logits
from surgery.preprocess import normalize, preprocess_bytes



def _write_folder(root, **kw):
    def put(p, b):
        (root / p).parent.mkdir(parents=True, exist_ok=True)
        (root / p).write_bytes(b)

    return write_image_folder(put, **kw)


def _head_model(base, n_out, ftc, frozen="global_pool", loss="cross_entropy"):
    return (TransferLearning(base).fine_tune_configuration(ftc).set_feature_extractor(frozen)
            .remove_vertex_keep_connections("classifier")
            .add_layer("classifier", Output(n_out, loss=loss)).build())


@pytest.fixture(scope="module")
def shapes(tmp_path_factory, ray_session, lite0_imagenet):
    """Generated colour/shape classes (train, val) and their lite0 features at 64 px."""
    root = tmp_path_factory.mktemp("shapes")
    _write_folder(root / "train", per_class=40, size=40, seed=1, odd_modes=False)
    _write_folder(root / "val", per_class=15, size=40, seed=2, odd_modes=False)
    for p, b in bad_files().items():
        if p != "green_square/notes.jpg":
            (root / "val" / p).write_bytes(b)
    ftc = FineTuneConfiguration(updater="adam", lr=3e-3, seed=11)
    model = _head_model(lite0_imagenet, 3, ftc)
    kw = dict(image_size=64, dtype="float32")
    train = featurize(model, str(root / "train"), str(root / "f-train"), **kw)
    val = featurize(model, str(root / "val"), str(root / "f-val"), **kw)
    return {"root": root, "model": model, "train": train, "val": val}


@pytest.fixture(scope="module")
def two_runs(shapes, tmp_path_factory):
    """The same two-worker run twice (a Ray Train run costs about 25 s here, so the
    evaluation test below reuses the first one's model)."""
    storage = str(tmp_path_factory.mktemp("runs"))
    return [fit_head(shapes["model"], shapes["train"], validation=shapes["val"], epochs=4, batch_size=16,
                     num_workers=2, cpus_per_worker=1, storage=storage, name=f"repro-{i}") for i in range(2)]


def test_fit_head_two_workers_learns_and_is_reproducible(shapes, two_runs, tmp_path):
    runs = two_runs
    r = runs[0]
    assert r.history[-1]["val_accuracy"] >= 0.9
    losses = [h["loss"] for h in r.history]
    assert losses[-1] < losses[0] and all(b <= a * 1.05 for a, b in zip(losses, losses[1:]))
    assert r.history[0]["rows"] == 120 and r.history[0]["val_rows"] == 45
    assert set(r.history[0]) >= {"loss", "accuracy", "val_loss", "val_accuracy", "lr"}
    a, b = runs[0].model.state_dict(), runs[1].model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seed, data and workers: same weights
    assert not torch.equal(a["classifier.linear.weight"], shapes["model"].state_dict()["classifier.linear.weight"])
    assert os.path.isdir(r.checkpoint)
    surgery.save(r.model, str(tmp_path / "model"))
    back = surgery.load(str(tmp_path / "model"))
    assert torch.equal(back.state_dict()["classifier.linear.weight"], a["classifier.linear.weight"])


def test_evaluate_on_features_and_images_agree_and_predict_writes_every_readable_input(shapes, two_runs, tmp_path):
    model = two_runs[0].model
    on_features = evaluate(model, shapes["val"].uri)
    on_images = evaluate(model, str(shapes["root"] / "val"), image_size=64)
    assert on_features.rows == on_images.rows == 45 and on_images.errors == 2
    assert on_features.accuracy == on_images.accuracy
    assert on_features.loss == pytest.approx(on_images.loss, rel=1e-4)
    assert on_features.confusion == on_images.confusion and np.sum(on_features.confusion) == 45
    assert [c["class"] for c in on_features.per_class] == ["blue_bar", "green_square", "red_disc"]

    out = predict(model, str(shapes["root"] / "val"), str(tmp_path / "pred"), image_size=64)
    assert out.rows == 45 and out.errors == 2
    table = pq.read_table(str(tmp_path / "pred" / "shards"))
    assert table.num_rows == 45 and len(set(table.column("path").to_pylist())) == 45
    assert set(table.column_names) >= {"path", "predicted", "class_name", "probabilities"}
    probs = table.column("probabilities").combine_chunks().to_numpy_ndarray()
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    acc = np.mean(np.asarray(table.column("predicted")) == np.asarray(table.column("label")))
    assert acc == pytest.approx(on_images.accuracy)
    with pytest.raises(FileExistsError, match="already holds predictions"):
        predict(model, str(shapes["root"] / "val"), str(tmp_path / "pred"))


def test_bad_input_is_refused_before_any_work(shapes, tmp_path, tiny_name, lite0_imagenet):
    other = TransferLearning(surgery.zoo.load(tiny_name)).set_feature_extractor("flatten").build()
    with pytest.raises(FeatureMismatch, match="fingerprint"):
        fit_head(other, shapes["train"])
    two = _head_model(lite0_imagenet, 2, FineTuneConfiguration())
    with pytest.raises(ValueError, match=r"the data has 3 classes but output 'classifier' has 2 units"):
        fit_head(two, shapes["train"])
    bce = _head_model(lite0_imagenet, 5, FineTuneConfiguration(), loss="bce")
    with pytest.raises(ValueError, match=r"loss 'bce' on output 'classifier' compares 5 values with one-hot labels of 3"):
        fit_head(bce, shapes["train"])
    empty = tmp_path / "empty"
    for p, b in bad_files().items():
        (empty / p).parent.mkdir(parents=True, exist_ok=True)
        (empty / p).write_bytes(b)
    none = featurize(shapes["model"], str(empty), str(tmp_path / "f-empty"), image_size=64)
    assert none.rows == 0 and none.errors == 3
    with pytest.raises(ValueError, match="zero rows"):
        fit_head(shapes["model"], none)


def test_head_weights_equal_end_to_end_training(ray_session, tmp_path, tiny_name):
    root = tmp_path / "imgs"
    _write_folder(root, per_class=8, size=20, odd_modes=False)
    ftc = FineTuneConfiguration(updater="nesterov", lr=0.05, momentum=0.9, weight_decay=1e-3, l2=1e-3, seed=3)
    model = (TransferLearning(surgery.zoo.load(tiny_name)).fine_tune_configuration(ftc).set_feature_extractor("flatten")
             .remove_vertex_and_connections("fc1").add_layer("hidden", Dense(12, activation="tanh"), "flatten")
             .add_layer("out", Output(3, loss="nll"), "hidden").set_outputs("out").build())
    fset = featurize(model, str(root), str(tmp_path / "f"), dtype="float32")
    result = fit_head(model, fset, epochs=2, batch_size=5, num_workers=1, shuffle=False, storage=str(tmp_path / "runs"))

    src = read_images(str(root))
    config = surgery.get_info(model).preprocessing
    x = normalize(torch.from_numpy(np.stack([preprocess_bytes(open(p, "rb").read(), config) for p in src.paths])), config)
    y = torch.from_numpy(src.labels.astype(np.int64))
    reference = surgery.load(_saved(model, tmp_path))
    optimizer = ftc.build_optimizer(reference)
    specs = surgery.loss_specs(reference)
    reference.train()
    for _ in range(2):
        for i in range(0, len(y), 5):
            with emit_logits(reference):
                loss = surgery.objective(specs, reference(x[i:i + 5]), y[i:i + 5]) + ftc.penalty(reference)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    got, want = result.model.state_dict(), reference.state_dict()
    for k in ("hidden.linear.weight", "hidden.linear.bias", "out.linear.weight", "out.linear.bias"):
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)
    assert not torch.equal(got["out.linear.weight"], model.state_dict()["out.linear.weight"])


def _saved(model, tmp_path):
    surgery.save(model, str(tmp_path / "start"))
    return str(tmp_path / "start")


def test_finetune_from_images_keeps_frozen_layers_frozen(ray_session, tmp_path, tiny_name):
    root = tmp_path / "imgs"
    _write_folder(root / "train", per_class=20, size=20, odd_modes=False)
    _write_folder(root / "val", per_class=6, size=20, seed=5, odd_modes=False)
    ftc = FineTuneConfiguration(updater="adam", lr=1e-2, seed=0)
    model = (TransferLearning(surgery.zoo.load(tiny_name)).fine_tune_configuration(ftc).set_feature_extractor("bn1")
             .remove_vertex_keep_connections("fc2").add_layer("fc2", Output(3, loss="cross_entropy")).build())
    frozen_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("conv1", "bn1"))}
    r = finetune(model, str(root / "train"), validation=str(root / "val"), epochs=4, batch_size=10,
                 num_workers=1, cpus_per_worker=1, augment=False, storage=str(tmp_path / "runs"))
    after = r.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen_before.items())
    assert not torch.equal(after["conv2.weight"], model.state_dict()["conv2.weight"])
    assert r.history[-1]["loss"] < r.history[0]["loss"] and r.history[-1]["val_rows"] == 18
    assert r.history[-1]["val_accuracy"] >= 0.6


def test_early_stopping_ends_a_run_that_stops_improving(shapes, tmp_path, lite0_imagenet):
    frozen_lr = _head_model(lite0_imagenet, 3, FineTuneConfiguration(updater="sgd", lr=0.0, seed=1))
    r = fit_head(frozen_lr, shapes["train"], validation=shapes["val"], epochs=10, batch_size=32, num_workers=1,
                 early_stopping_patience=2, storage=str(tmp_path / "runs"))
    assert [h["epoch"] for h in r.history] == [0, 1, 2]  # no better validation loss after epoch 0
    assert r.history[-1]["stopped_early"] and len({h["val_loss"] for h in r.history}) == 1
