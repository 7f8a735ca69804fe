"""fit_head / finetune / evaluate / predict on the shared Ray session: local mode against
Ray Train workers, the best epoch's weights, resume by name, accuracy, equivalence with
end-to-end training, and errors before any work. Worker failures and bad checkpoints are
in tests/reliability/test_train_faults.py; the digits quality check in
test_transfer_digits.py."""

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from imagesets import bad_files, write_folder

import surgery
from freezeray.images import preprocess_bytes
from pipeline import (
    Batches,
    FeatureMismatch,
    Resources,
    Run,
    Stopping,
    evaluate,
    featurize,
    finetune,
    fit_head,
    predict,
    read_images,
)
from pipeline.decode import normalize
from pipeline.head import choose_workers, default_batch_size
from surgery import FineTuneConfiguration, TransferLearning
from surgery.layers import Dense, Output, emit_logits
from surgery.training import DEFAULT_PATIENCE


def test_local_mode_and_two_workers_take_the_same_steps(tiny, tmp_path):
    # SGD: Adam divides by the gradient's size, which turns the rounding differences of
    # averaging two half-batch gradients into visible ones where gradients are near zero
    sgd = FineTuneConfiguration(updater="nesterov", lr=0.05, l2=1e-3, seed=4)
    model, train = TransferLearning(tiny["model"]).fine_tune_configuration(sgd).build(), tiny["train"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # full batches without shuffling: one process with batch 60 and two workers with 30 each see the same rows per step
    local = fit_head(model, train, stopping=Stopping(epochs=3), batches=Batches(batch_size=60, shuffle=False),
                     resources=Resources(num_workers=0), run=Run(storage=str(tmp_path), name="l"))
    workers = fit_head(model, train, stopping=Stopping(epochs=3), batches=Batches(batch_size=30, shuffle=False),
                       resources=Resources(num_workers=2), run=Run(storage=str(tmp_path), name="w"))
    assert (local.mode, local.workers, workers.mode, workers.workers) == ("local", 0, "workers", 2)
    for k, v in local.model.state_dict().items():
        torch.testing.assert_close(workers.model.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    assert not torch.equal(local.model.state_dict()["fc2.linear.weight"], before["fc2.linear.weight"])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # the caller's model is untouched
    assert [h["rows"] for h in local.history] == [h["rows"] for h in workers.history] == [60, 60, 60]
    for name, result in (("l", local), ("w", workers)):  # both keep checkpoints under storage/name
        assert result.checkpoint.startswith(str(tmp_path / name) + "/checkpoint_")
        assert os.path.isfile(os.path.join(result.checkpoint, "meta.json"))
    assert workers.startup_s > local.startup_s


def test_epochs_none_stops_returns_the_best_weights_and_resumes_by_name(tiny, tmp_path):
    model = tiny["model"]
    r = fit_head(model, tiny["train"], validation=tiny["rotated"], run=Run(storage=str(tmp_path), name="best"))
    losses = [h["val_loss"] for h in r.history]
    assert r.mode == "local" and r.history[-1]["stopped_early"] and len(losses) == r.best_epoch + 1 + DEFAULT_PATIENCE
    assert r.best_epoch == int(np.argmin(losses)) and losses[-1] > losses[r.best_epoch] + 0.1
    scored = evaluate(r.model, tiny["rotated"])  # the returned weights are the best epoch's, not the last's
    assert scored.loss == pytest.approx(losses[r.best_epoch], rel=1e-4)
    assert r.metrics["epoch"] == r.best_epoch

    events = []
    first = fit_head(model, tiny["train"], validation=tiny["val"], stopping=Stopping(epochs=3),
                     resources=Resources(num_workers=0),
                     run=Run(storage=str(tmp_path), name="again", callback=events.append))
    assert [e["event"] for e in events].count("resume") == 0
    events.clear()
    second = fit_head(model, tiny["train"], validation=tiny["val"], stopping=Stopping(epochs=5),
                      resources=Resources(num_workers=0),
                      run=Run(storage=str(tmp_path), name="again", callback=events.append))
    resumed = [e for e in events if e["event"] == "resume"]
    assert len(resumed) == 1 and resumed[0]["epoch"] == 2 and resumed[0]["skipped"] == []
    assert [e["epoch"] for e in events if e["event"] == "epoch_end"] == [3, 4]
    assert [h["epoch"] for h in second.history] == [0, 1, 2, 3, 4]
    assert [h["loss"] for h in second.history[:3]] == [h["loss"] for h in first.history]
    straight = fit_head(model, tiny["train"], validation=tiny["val"], stopping=Stopping(epochs=5),
                        resources=Resources(num_workers=0), run=Run(storage=str(tmp_path), name="straight"))
    for k, v in straight.model.state_dict().items():  # resumed == uninterrupted, bit for bit
        assert torch.equal(second.model.state_dict()[k], v), k
    done = fit_head(model, tiny["train"], validation=tiny["rotated"], run=Run(storage=str(tmp_path), name="best"))
    assert done.best_epoch == r.best_epoch and len(done.history) == len(r.history)  # a finished run stays finished


def test_automatic_mode_and_batch_size(tiny, monkeypatch):
    assert default_batch_size(1_200) == 16 and default_batch_size(100_000) == 512 and default_batch_size(10) == 16
    assert default_batch_size(8_000) == 128
    assert choose_workers(None, False, 10 << 20) == 0  # fits: local mode
    monkeypatch.setenv("FREEZERAY_LOCAL_LIMIT_BYTES", "1000")
    assert choose_workers(None, False, 10 << 20) == 2  # too big for this process: one worker per CPU
    assert choose_workers(3, False, 10) == 3
    with pytest.raises(ValueError, match="num_workers must be a non-negative integer"):
        choose_workers(-1, False, 10)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory, ray_session, lite0_imagenet):
    """Generated colour/shape classes (train, val) and their lite0 features at 64 px."""
    root = tmp_path_factory.mktemp("shapes")
    write_folder(root / "train", per_class=40, size=40, seed=1, odd_modes=False)
    write_folder(root / "val", per_class=15, size=40, seed=2, odd_modes=False)
    for p, b in bad_files().items():
        if p != "green_square/notes.jpg":
            (root / "val" / p).write_bytes(b)
    model = (TransferLearning(lite0_imagenet).fine_tune_configuration(FineTuneConfiguration(seed=11))
             .set_feature_extractor("global_pool").remove_vertex_keep_connections("classifier")
             .add_layer("classifier", Output(3, loss="cross_entropy")).build())
    kw = dict(image_size=64, dtype="float32")
    train = featurize(model, str(root / "train"), str(root / "f-train"), **kw)
    val = featurize(model, str(root / "val"), str(root / "f-val"), **kw)
    return {"root": root, "model": model, "train": train, "val": val}


def test_fit_head_with_defaults_learns_and_evaluate_and_predict_agree(shapes, tmp_path):
    r = fit_head(shapes["model"], shapes["train"], validation=shapes["val"], run=Run(storage=str(tmp_path / "runs")))
    assert r.mode == "local" and r.metrics["val_accuracy"] >= 0.95 and r.history[0]["val_rows"] == 45
    surgery.save(r.model, str(tmp_path / "model"))
    model = surgery.load(str(tmp_path / "model"))
    on_features = evaluate(model, shapes["val"].uri)
    on_images = evaluate(model, str(shapes["root"] / "val"), image_size=64)
    assert on_features.rows == on_images.rows == 45 and on_images.errors == 2
    assert on_features.accuracy == on_images.accuracy == r.metrics["val_accuracy"]
    assert on_features.loss == pytest.approx(on_images.loss, rel=1e-4)
    assert on_features.loss == pytest.approx(r.metrics["val_loss"], rel=1e-4)
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
    two = (TransferLearning(lite0_imagenet).set_feature_extractor("global_pool")
           .remove_vertex_keep_connections("classifier").add_layer("classifier", Output(2)).build())
    with pytest.raises(ValueError, match=r"the data has 3 classes but output 'classifier' has 2 units"):
        fit_head(two, shapes["train"])
    bce = (TransferLearning(lite0_imagenet).set_feature_extractor("global_pool")
           .remove_vertex_keep_connections("classifier").add_layer("classifier", Output(5, loss="bce")).build())
    with pytest.raises(ValueError, match=r"loss 'bce' on output 'classifier' compares 5 values with one-hot labels of 3"):
        fit_head(bce, shapes["train"])
    with pytest.raises(ValueError, match="epochs must be a positive integer or None, got 0"):
        fit_head(shapes["model"], shapes["train"], stopping=Stopping(epochs=0))
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
    write_folder(root, per_class=8, size=20, odd_modes=False)
    ftc = FineTuneConfiguration(updater="nesterov", lr=0.05, momentum=0.9, weight_decay=1e-3, l2=1e-3, seed=3)
    model = (TransferLearning(surgery.zoo.load(tiny_name)).fine_tune_configuration(ftc).set_feature_extractor("flatten")
             .remove_vertex_and_connections("fc1").add_layer("hidden", Dense(12, activation="tanh"), "flatten")
             .add_layer("out", Output(3, loss="nll"), "hidden").set_outputs("out").build())
    fset = featurize(model, str(root), str(tmp_path / "f"), dtype="float32")
    result = fit_head(model, fset, stopping=Stopping(epochs=2), batches=Batches(batch_size=5, shuffle=False),
                      resources=Resources(num_workers=0), run=Run(storage=str(tmp_path / "runs")))

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
    assert result.best_epoch == 1  # no validation: the training loss, which fell every epoch
    got, want = result.model.state_dict(), reference.state_dict()
    for k in ("hidden.linear.weight", "hidden.linear.bias", "out.linear.weight", "out.linear.bias"):
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)
    assert not torch.equal(got["out.linear.weight"], model.state_dict()["out.linear.weight"])


def _saved(model, tmp_path):
    surgery.save(model, str(tmp_path / "start"))
    return str(tmp_path / "start")


def test_finetune_from_images_in_local_mode_keeps_frozen_layers_frozen(ray_session, tmp_path, tiny_name):
    root = tmp_path / "imgs"
    write_folder(root / "train", per_class=20, size=20, odd_modes=False)
    write_folder(root / "val", per_class=6, size=20, seed=5, odd_modes=False)
    ftc = FineTuneConfiguration(updater="adam", lr=1e-2, seed=0)
    model = (TransferLearning(surgery.zoo.load(tiny_name)).fine_tune_configuration(ftc).set_feature_extractor("bn1")
             .remove_vertex_keep_connections("fc2").add_layer("fc2", Output(3, loss="cross_entropy")).build())
    frozen_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("conv1", "bn1"))}
    r = finetune(model, str(root / "train"), validation=str(root / "val"), stopping=Stopping(epochs=4),
                 batches=Batches(batch_size=10, augment=False), resources=Resources(num_workers=0),
                 run=Run(storage=str(tmp_path / "runs")))
    after = r.model.state_dict()
    assert r.mode == "local" and all(torch.equal(after[k], v) for k, v in frozen_before.items())
    assert not torch.equal(after["conv2.weight"], model.state_dict()["conv2.weight"])
    assert r.history[-1]["loss"] < r.history[0]["loss"] and r.history[-1]["val_rows"] == 18
    assert r.metrics["val_accuracy"] >= 0.6
