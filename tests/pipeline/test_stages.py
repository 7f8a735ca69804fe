"""Staged fine-tuning, per-block learning rates, fresh augmentation every epoch, mixed
precision and best weights in ``finetune``: the head first on the cached features, then
more of the model from the images."""

import dataclasses

import numpy as np
import pytest
import torch

import pipeline
import pipeline.readers as readers
import pipeline.train as train_module
from freezeray.schema import SchemaError
from pipeline import Stage, evaluate, finetune
from surgery import FineTuneConfiguration, TransferLearning
from surgery.training import precision
from surgery.training.augment import Augmentation, check_augment

HEAD = ("fc1.", "fc2.")


def _trainable_only_changed(before, after, trainable):
    """Names of tensors outside ``trainable`` (prefixes) that changed, and whether a trainable one did."""
    outside = [k for k in before if not k.startswith(trainable) and not torch.equal(before[k], after[k])]
    inside = any(not torch.equal(before[k], after[k]) for k in before if k.startswith(trainable))
    return outside, inside


@pytest.fixture()
def decodes(monkeypatch):
    """Each image dataset finetune builds (every decode task comes from one), with the stage it was built in."""
    calls, stage = [], {"now": None}
    real = readers.image_dataset

    def spy(src, config, *a, **k):
        calls.append(stage["now"])
        return real(src, config, *a, **k)

    monkeypatch.setattr(readers, "image_dataset", spy)
    return calls, stage


def test_a_staged_run_trains_the_head_on_features_then_unfreezes_with_frozen_layers_unchanged(tiny, tmp_path, decodes):
    calls, stage_now = decodes
    model = TransferLearning(tiny["model"]).fine_tune_configuration(
        FineTuneConfiguration(updater="adam", lr=0.05, seed=4, mixed_precision=True)).build()
    events = []

    def callback(e):
        stage_now["now"] = e.get("stage")
        if e["event"] == "epoch_end":
            events.append((e["stage"], e["epoch"], len(calls)))

    r = finetune(model, str(tiny["root"] / "train"), validation=str(tiny["root"] / "val"),
                 batches=pipeline.Batches(batch_size=20), resources=pipeline.Resources(num_workers=0),
                 run=pipeline.Run(storage=str(tmp_path), name="staged", callback=callback),
                 stages=[Stage(epochs=3, features=tiny["train"]),
                         Stage(unfreeze=("conv2", "bn2"), epochs=2, lr=1e-3, train_bn=False),
                         Stage(unfreeze=("conv1", "bn1"), epochs=1, lr=1e-3)])
    # stage 0 read the feature set: no image was decoded while it ran; stages 1 and 2 decoded their images
    assert [(s, e) for s, e, _ in events] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0)]
    assert all(n == 0 for s, _, n in events if s == 0) and all(n >= 1 for s, _, n in events if s > 0)
    assert [h["stage"] for h in r.history] == [0, 0, 0, 1, 1, 2] and len(r.stages) == 3
    assert [s.run for s in r.stages] == ["staged-stage0", "staged-stage1", "staged-stage2"] and r.run == "staged"
    start, first, second, third = (m.state_dict() for m in (model, *(s.model for s in r.stages)))
    outside, inside = _trainable_only_changed(start, first, HEAD)
    assert outside == [] and inside  # stage 0: only the head moved
    outside, inside = _trainable_only_changed(first, second, HEAD + ("conv2.", "bn2.weight", "bn2.bias"))
    assert outside == [] and inside  # stage 1: conv1/bn1 bit for bit, bn2's running statistics too (train_bn=False)
    assert not torch.equal(first["conv2.weight"], second["conv2.weight"])
    outside, inside = _trainable_only_changed(second, third, HEAD + ("conv", "bn"))
    assert outside == [] and not torch.equal(second["bn1.running_mean"], third["bn1.running_mean"])  # the default
    # each stage's model is a plain one again: frozen as its stage left it, no BatchNorm kept in inference mode
    bn2 = r.stages[1].model.get_submodule("bn2")
    assert bn2.weight.requires_grad and not any(h.__name__ == "_keep_eval" for h in bn2._forward_pre_hooks.values())
    assert not r.stages[1].model.get_submodule("conv1").weight.requires_grad
    assert all(p.requires_grad for p in r.model.parameters())  # stage 2 unfroze the rest


def test_a_staged_run_resumes_mid_stage_by_name(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "LOCAL_CHECKPOINT_EVERY_S", 0.0)  # a checkpoint every epoch
    stages = [Stage(epochs=2, features=tiny["train"]), Stage(unfreeze=("conv2", "bn2"), epochs=4, lr=1e-3)]
    kw = dict(resources=pipeline.Resources(num_workers=0), batches=pipeline.Batches(batch_size=20), stages=stages,
              validation=str(tiny["root"] / "val"))
    run = pipeline.Run(storage=str(tmp_path), name="again")

    def crash(e):
        if e["event"] == "epoch_end" and e["stage"] == 1 and e["epoch"] == 1:
            raise RuntimeError("the driver dies in stage 1")

    with pytest.raises(Exception, match="the driver dies in stage 1"):
        finetune(tiny["model"], str(tiny["root"] / "train"), run=dataclasses.replace(run, callback=crash), **kw)
    events = []
    r = finetune(tiny["model"], str(tiny["root"] / "train"), run=dataclasses.replace(run, callback=events.append), **kw)
    trained = [(e["stage"], e["epoch"]) for e in events if e["event"] == "epoch_end"]
    resumed = [(e["stage"], e["epoch"]) for e in events if e["event"] == "resume"]
    assert trained == [(1, 2), (1, 3)]  # stage 0 was finished, stage 1 goes on after its epoch 1
    assert resumed == [(0, 1), (1, 1)]
    assert [h["stage"] for h in r.history] == [0, 0, 1, 1, 1, 1]


def test_stages_name_their_problems():
    with pytest.raises(SchemaError, match="either frozen"):
        Stage(frozen="flatten", unfreeze=("conv2",))
    with pytest.raises(SchemaError, match="lr"):
        Stage(lr=-1)


def test_a_stage_that_names_a_missing_vertex_fails_before_training(tiny, tmp_path):
    with pytest.raises(Exception, match="'conv9' is not in"):  # the last stage's typo, found before the first trains
        finetune(tiny["model"], str(tiny["root"] / "train"), resources=pipeline.Resources(num_workers=0),
                 run=pipeline.Run(storage=str(tmp_path), name="typo"),
                 stages=[Stage(epochs=1, features=tiny["train"]), Stage(unfreeze=("conv2",), epochs=1),
                         Stage(frozen="conv9")])
    assert not any(tmp_path.iterdir())  # no stage ran
    with pytest.raises(ValueError, match="stages is empty"):
        finetune(tiny["model"], str(tiny["root"] / "train"), resources=pipeline.Resources(num_workers=0),
                 run=pipeline.Run(storage=str(tmp_path)), stages=[])


def test_per_block_multipliers_and_the_slice_reach_the_optimizer_for_any_module():
    import timm

    model = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=3)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(("blocks.5", "blocks.6", "conv_head", "bn2", "classifier")))
    ftc = FineTuneConfiguration(lr=1e-3, lr_multipliers={"blocks.5": 0.1, "blocks.6": 0.3})
    groups = ftc.build_optimizer(model).param_groups
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert lr_of[id(params["blocks.5.0.conv_pw.weight"])] == pytest.approx(1e-4)
    assert lr_of[id(params["blocks.6.0.conv_pw.weight"])] == pytest.approx(3e-4)
    assert lr_of[id(params["classifier.weight"])] == pytest.approx(1e-3)
    assert id(params["blocks.4.0.conv_pw.weight"]) not in lr_of  # frozen: no optimizer state
    ramp = FineTuneConfiguration(lr_slice=(1e-5, 1e-3)).build_optimizer(model).param_groups
    lr_of = {id(p): g["lr"] for g in ramp for p in g["params"]}
    lrs = [lr_of[id(params[k])] for k in ("blocks.5.0.conv_pw.weight", "blocks.6.0.conv_pw.weight",
                                          "conv_head.weight", "classifier.weight")]
    assert lrs[0] == pytest.approx(1e-5) and lrs[-1] == pytest.approx(1e-3) and lrs == sorted(lrs)


def test_augmentation_is_fresh_every_epoch_and_the_same_for_the_same_seed():
    pixels = torch.randint(0, 256, (4, 40, 40, 3), dtype=torch.uint8)
    aug = Augmentation(check_augment(True), (32, 32))
    e0, e1 = aug(pixels, [7, 8, 9, 10], seed=1, epoch=0), aug(pixels, [7, 8, 9, 10], seed=1, epoch=1)
    assert e0.shape == (4, 3, 32, 32) and e0.dtype == torch.uint8
    assert all(not torch.equal(a, b) for a, b in zip(e0, e1))  # every row drew new crops
    assert torch.equal(aug(pixels, [7, 8, 9, 10], seed=1, epoch=0), e0)  # a rerun sees the same ones
    assert not torch.equal(aug(pixels, [7, 8, 9, 10], seed=2, epoch=0), e0)
    state = torch.get_rng_state()
    aug(pixels, [1, 2, 3, 4], seed=0, epoch=0)
    assert torch.equal(state, torch.get_rng_state())  # the caller's random state is left alone
    only_flip = Augmentation([{"RandomHorizontalFlip": {"p": 1.0}}], (40, 40))(pixels, [0, 1, 2, 3], seed=0, epoch=0)
    assert torch.equal(only_flip, pixels.permute(0, 3, 1, 2).flip(-1))


def test_the_training_stream_augments_each_epoch_differently():
    from freezeray.images import PreprocessConfig

    class Stream:  # the two batches a Ray Data shard would give, every epoch the same decoded squares
        def iter_torch_batches(self, **_):
            for lo in (0, 3):
                yield {"pixels": torch.full((3, 20, 20, 3), 100, dtype=torch.uint8) + torch.arange(20).view(1, 1, 20, 1),
                       "row_id": torch.arange(lo, lo + 3), "label": torch.zeros(3, dtype=torch.long)}

    config = PreprocessConfig(input_size=(3, 16, 16), crop_pct=0.8)
    s = train_module.TrainSettings(stopping={}, batch_size=3, shuffle=True, seed=5, inputs="pixels", feature_columns=(),
                                   preprocessing=config.to_dict(), losses=(), fine_tune={}, validation=False,
                                   world_size=0, run="r", storage="/tmp", in_memory=False, augment=check_augment(True))
    batches = train_module._streamed(Stream(), s, torch.device("cpu"), 0, True, config, augment=True)
    first, second, again = ([x[0] for x, _ in batches(e)] for e in (0, 1, 0))
    assert first[0].shape == (3, 3, 16, 16)
    assert not torch.equal(first[0], second[0]) and all(torch.equal(a, b) for a, b in zip(first, again))


def test_bad_transforms_are_named():
    with pytest.raises(ValueError, match="RandomResizedCrop"):  # the close match for a typo
        check_augment(["RandomResizeCrop"])
    with pytest.raises(ValueError, match="ColorJitter"):
        check_augment([{"ColorJitter": {"brightnes": 0.2}}])


def test_mixed_precision_follows_the_device(monkeypatch):
    import surgery.training.loop as training

    cpu = torch.device("cpu")
    assert precision(False, cpu) == (None, None) and precision("fp16", cpu) == (None, None)  # fp16 needs CUDA
    monkeypatch.setattr(training, "cpu_bf16", lambda: False)
    assert precision(True, cpu) == (None, None)
    monkeypatch.setattr(training, "cpu_bf16", lambda: True)
    autocast, scaler = precision(True, cpu)
    assert autocast.fast_dtype == torch.bfloat16 and scaler is None
    layer = torch.nn.Linear(8, 3)
    with autocast:
        out = layer(torch.randn(4, 8))
    assert out.dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_fp16_on_cuda_uses_a_scaler():
    autocast, scaler = precision("fp16", torch.device("cuda"))
    assert autocast.fast_dtype == torch.float16 and scaler is not None


def test_finetune_returns_the_best_epochs_weights(tiny, tmp_path):
    # validation images whose class folders are rotated: training makes them ever more wrong, so the best epoch is early
    model = tiny["model"]
    r = finetune(model, str(tiny["root"] / "train"), validation=str(tiny["root"] / "rotated"),
                 stopping=pipeline.Stopping(patience=3), batches=pipeline.Batches(batch_size=20, augment=False),
                 resources=pipeline.Resources(num_workers=0), run=pipeline.Run(storage=str(tmp_path), name="best"))
    losses = [h["val_loss"] for h in r.history]
    assert r.history[-1]["stopped_early"] and r.best_epoch == int(np.argmin(losses)) and r.best_epoch < len(losses) - 1
    assert losses[-1] > losses[r.best_epoch]
    scored = evaluate(r.model, str(tiny["root"] / "rotated"))
    assert scored.loss == pytest.approx(losses[r.best_epoch], rel=1e-3)


def test_stage_is_exported():
    assert pipeline.Stage is Stage
