"""Issue 21 in the pipeline: a model with two outputs trains with fit_head (on features)
and finetune (from images), is evaluated output by output and reported (defect 4); and
features made before a cosmetic torch upgrade (FX code and extra_repr printed
differently) are reused, not recomputed (defect 6)."""

import json

import pytest
import torch
import torch.fx as fx
from torch import nn

import surgery
from jobs.config import parse_config
from jobs.outcome import RunOutcome
from jobs.report import write_report
from pipeline import Batches, Resources, Run, Stopping, evaluate, featurize, finetune, fit_head
from surgery import FineTuneConfiguration, TransferLearning
from surgery.layers import Output


def _two_outputs(tiny):
    """The tiny model (frozen to flatten, fc1 -> fc2) with an auxiliary output on fc1, weighted 0.5."""
    return (TransferLearning(tiny["model"]).add_layer("aux", Output(3, loss="cross_entropy", weight_init="xavier"), "fc1")
            .set_outputs("fc2", "aux").fine_tune_configuration(FineTuneConfiguration(loss_weights={"aux": 0.5})).build())


def test_two_outputs_train_evaluate_and_report(tiny, tmp_path):
    model = _two_outputs(tiny)
    assert [(s.vertex, s.weight) for s in surgery.loss_specs(model)] == [("fc2", 1.0), ("aux", 0.5)]
    result = fit_head(model, tiny["train"], validation=tiny["val"], stopping=Stopping(epochs=4),
                      resources=Resources(num_workers=0), run=Run(storage=str(tmp_path), name="two"))
    for h in result.history:  # a loss and an accuracy per output; the loss is their weighted sum
        assert h["loss"] == pytest.approx(h["fc2_loss"] + 0.5 * h["aux_loss"], rel=1e-5)
        assert h["val_loss"] == pytest.approx(h["val_fc2_loss"] + 0.5 * h["val_aux_loss"], rel=1e-5)
        assert h["accuracy"] == h["fc2_accuracy"] and 0.0 <= h["val_aux_accuracy"] <= 1.0
    assert result.history[-1]["aux_loss"] < result.history[0]["aux_loss"]  # the auxiliary head trains too
    trained = result.model
    assert not torch.equal(trained.aux.linear.weight, model.aux.linear.weight)

    ev = evaluate(trained, tiny["val"])  # features: the head runs, both outputs scored against the labels
    assert set(ev.outputs) == {"fc2", "aux"} and ev.accuracy == ev.outputs["fc2"]["accuracy"]
    assert ev.loss == pytest.approx(ev.outputs["fc2"]["loss"] + 0.5 * ev.outputs["aux"]["loss"], rel=1e-5)
    assert ev.loss == pytest.approx(result.metrics["val_loss"], rel=1e-4)  # the best epoch's weights
    assert ev.outputs["aux"]["accuracy"] == pytest.approx(result.metrics["val_aux_accuracy"])

    cfg = parse_config({"name": "two", "model": {"base": "tiny_cnn_test"}})
    page = write_report(str(tmp_path / "report"), RunOutcome(cfg, model=trained, fit=result, evaluation=ev))
    text = open(page).read()
    assert "| output | weight | accuracy | loss | macro F1 |" in text and "| aux | 0.5 |" in text
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert set(metrics["evaluation"]["outputs"]) == {"fc2", "aux"}
    assert "aux_loss" in metrics["history"][0] and (tmp_path / "report" / "curves.png").stat().st_size > 0

    tuned = finetune(trained, str(tiny["root"] / "train"), stopping=Stopping(epochs=1),
                     batches=Batches(augment=False), resources=Resources(num_workers=0),
                     run=Run(storage=str(tmp_path), name="two-images"))  # from images, both outputs
    assert {"fc2_loss", "aux_loss", "fc2_accuracy", "aux_accuracy"} <= set(tuned.history[0])
    assert tuned.history[0]["loss"] == pytest.approx(tuned.history[0]["fc2_loss"] + 0.5 * tuned.history[0]["aux_loss"], rel=1e-5)
    images = evaluate(tuned.model, str(tiny["root"] / "val"))  # images: the whole model, both outputs
    assert set(images.outputs) == {"fc2", "aux"} and images.rows == tiny["val"].rows


def test_features_made_before_a_cosmetic_upgrade_are_reused(tiny, monkeypatch):
    printed = fx.GraphModule.code
    monkeypatch.setattr(fx.GraphModule, "code", property(lambda self: "# printed by a newer torch\n" + printed.fget(self)))
    monkeypatch.setattr(nn.Module, "extra_repr", lambda self: "printed differently")
    monkeypatch.setattr(nn.Conv2d, "extra_repr", lambda self: "printed differently")
    again = featurize(tiny["model"], str(tiny["root"] / "train"), str(tiny["root"] / "f-train"), dtype="float32")
    assert again.reused and again.fingerprint == tiny["train"].fingerprint and again.rows == tiny["train"].rows
    tiny["train"].check(_two_outputs(tiny))  # and the features still fit the model (FeatureSet.check)
