"""pipeline.sweep: many heads on one feature set with Ray Tune; the table, the best model,
the refusal of bad spaces before any trial, and the YAML/CLI/report path."""

import pytest
import torch
import yaml
from ray import tune

import surgery
from jobs.cli import main
from pipeline import Run, Stopping, Tuning, evaluate, sweep
from surgery import FineTuneConfiguration, TransferLearning
from surgery.layers import Dense, Output


@pytest.fixture(scope="module")
def hidden(tiny, tiny_name):
    """The tiny model's features with a hidden Dense layer before the output (same frozen part)."""
    torch.manual_seed(0)
    return (TransferLearning(surgery.zoo.load(tiny_name)).fine_tune_configuration(FineTuneConfiguration(seed=2))
            .set_feature_extractor("flatten").remove_vertex_and_connections("fc1")
            .add_layer("hidden", Dense(8, activation="relu"), "flatten").add_layer("out", Output(3), "hidden")
            .set_outputs("out").build())


def test_a_sweep_returns_every_trial_and_the_best_model(tiny, hidden, tmp_path):
    space = {"lr": tune.grid_search([1e-3, 3e-2]), "n_out.hidden": tune.grid_search([4, 16]),
             "weight_decay": tune.choice([0.0, 1e-4])}
    result = sweep(hidden, tiny["train"], space, validation=tiny["val"], stopping=Stopping(max_epochs=25),
                   run=Run(storage=str(tmp_path), name="s"))
    table = result.table
    assert len(table) == 4 and {"lr", "n_out.hidden", "weight_decay", "val_loss", "val_accuracy", "epochs",
                                "best_epoch", "ended_by"} <= set(table.columns)
    assert sorted(zip(table["lr"], table["n_out.hidden"])) == [(1e-3, 4), (1e-3, 16), (3e-2, 4), (3e-2, 16)]
    assert table["val_loss"].iloc[0] == table["val_loss"].min()  # best first
    assert set(table["ended_by"]) <= {"patience", "epochs", "scheduler"}
    best = result.best_model
    assert best.hidden.linear.out_features == result.best_config["n_out.hidden"]
    assert surgery.get_info(best).fine_tune.lr == result.best_config["lr"]  # saved with the settings it trained with
    scored = evaluate(best, tiny["val"])  # the weights are the best trial's best epoch
    assert scored.loss == pytest.approx(result.best_metrics["val_loss"], rel=1e-4)
    assert scored.loss == pytest.approx(table["val_loss"].min(), rel=1e-4)
    assert surgery.frozen_fingerprint(best) == surgery.frozen_fingerprint(hidden)
    assert len(result.curves) == 4 and all(len(c) >= 1 for c in result.curves.values())


def test_bad_sweeps_are_refused_before_any_trial(tiny, hidden, tmp_path):
    cases = [
        ({}, "the search space is empty"),
        ({"learning_rate": 0.1}, "learning_rate: unknown setting; valid settings: updater, lr"),
        ({"n_out.nowhere": tune.choice([4])}, "n_out.nowhere: vertex 'nowhere' is not in"),
        ({"n_out.hidden": tune.uniform(1, 9)}, "n_out.hidden: a width takes tune.choice"),
        ({"updater": tune.choice(["adam", "lamb"])}, "updater: must be one of"),
        ({"lr": tune.uniform(-1, 1)}, "lr: input should be greater than or equal to 0"),
        ({"epochs": tune.choice([0, 3])}, "epochs: must be positive integers"),
    ]
    for space, match in cases:
        with pytest.raises(ValueError, match=match):
            sweep(hidden, tiny["train"], space, run=Run(storage=str(tmp_path)))
    with pytest.raises(ValueError, match="metric 'val_f1' is never reported; trials report val_loss, val_accuracy"):
        sweep(hidden, tiny["train"], {"lr": 0.01}, tuning=Tuning(metric="val_f1"), run=Run(storage=str(tmp_path)))
    with pytest.raises(ValueError, match="mode must be 'min' or 'max'"):
        sweep(hidden, tiny["train"], {"lr": 0.01}, tuning=Tuning(mode="lowest"), run=Run(storage=str(tmp_path)))
    assert not list(tmp_path.iterdir())  # no trial ever started


def test_a_config_sweep_runs_from_the_cli_and_reports_its_trials(ray_session, tmp_path, tiny, tiny_name, capsys):
    config = {
        "name": "swept", "model": {"base": tiny_name},
        "surgery": [{"set_feature_extractor": "flatten"}, {"remove_vertex_keep_connections": "fc2"},
                    {"add_layer": {"name": "fc2", "layer": {"type": "Output", "n_out": 3}}}],
        "data": {"train": str(tiny["root"] / "train"), "test": str(tiny["root"] / "val")},
        "featurize": {"output": str(tmp_path / "features")},
        "training": {"max_epochs": 20, "storage": str(tmp_path / "runs"),
                     "sweep": {"space": {"lr": {"loguniform": [1e-3, 1e-1]}, "l2": {"choice": [0.0, 1e-3]}},
                               "num_samples": 3}},
        "outputs": {"model": str(tmp_path / "model"), "report": str(tmp_path / "report")},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    assert "sweep: 3 trials in" in out and "best val_loss" in out
    page = (tmp_path / "report" / "report.md").read_text()
    assert "## Sweep" in page and "![trials](sweep.png)" in page and page.count("| _trial_") == 0
    assert (tmp_path / "report" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert len((tmp_path / "report" / "sweep.csv").read_text().splitlines()) == 4
    assert surgery.load(str(tmp_path / "model")).fc2.linear.out_features == 3


@pytest.mark.slow
def test_a_set_too_large_for_memory_is_swept_on_a_sample_and_the_best_refit_on_every_row(tiny, hidden, tmp_path,
                                                                                        monkeypatch):
    from pipeline import featurize

    fset = featurize(tiny["model"], str(tiny["root"] / "train"), str(tmp_path / "f"), dtype="float32", shard_rows=10)
    assert len(fset.shards) == 6 and fset.rows == 60
    monkeypatch.setenv("FREEZERAY_LOCAL_LIMIT_BYTES", str(25 * 64 * 4))  # 25 rows of 64 float32 values fit
    result = sweep(hidden, fset, {"lr": tune.grid_search([1e-3, 3e-2])}, validation=tiny["val"],
                   stopping=Stopping(epochs=3), run=Run(storage=str(tmp_path / "runs"), name="big"))
    trial_rows = {c[-1]["rows"] for c in result.curves.values()}
    assert trial_rows == {20}  # the trials trained on a seeded sample of 2 shards
    assert result.refit is not None and [h["rows"] for h in result.refit.history] == [60, 60, 60]  # the best, on all
    assert surgery.get_info(result.best_model).fine_tune.lr == result.best_config["lr"]
    refit = result.refit.model.state_dict()
    assert all(torch.equal(v, refit[k]) for k, v in result.best_model.state_dict().items())
