"""Runs are identified by what defines them: the same name and definition resumes (or, for
a finished sweep, reuses), the same name with another definition is refused with one line
naming what changed (nothing trained, nothing written), and ``overwrite=True`` starts the
run again in its place. The CLI's side (exit code 2, the hint in the config's terms) is in
tests/jobs/test_jobs.py."""

import json
import os

import pytest
import torch

from pipeline import Batches, Resources, Run, RunMismatch, Stopping, Tuning, fit_head, sweep
from pipeline.runs import RUN_RECORD, claim_run
from surgery import FineTuneConfiguration, TransferLearning


def test_claim_run_records_new_runs_resumes_the_same_and_names_what_changed(tmp_path):
    definition = {"fine_tune": {"updater": "adam", "lr": None}, "batch_size": 16, "model": {"weights": "a" * 32}}
    assert claim_run(str(tmp_path), "r", "fit_head", definition) is False  # new: recorded
    record = json.loads((tmp_path / "r" / RUN_RECORD).read_text())
    assert record["definition"]["fine_tune.updater"] == "adam" and record["kind"] == "fit_head"
    assert claim_run(str(tmp_path), "r", "fit_head", definition) is True  # the same: resume

    # only a record (a run that failed before its first checkpoint): another definition replaces it
    other = {**definition, "batch_size": 32}
    assert claim_run(str(tmp_path), "r", "fit_head", other) is False
    (tmp_path / "r" / "checkpoint_2026").mkdir()
    changed = {**other, "fine_tune": {"updater": "sgd", "lr": 0.1}, "model": {"weights": "b" * 32}}
    with pytest.raises(RunMismatch, match=r"^run 'r' at .* was started with another definition \(fine_tune.lr default "
                                          r"-> 0.1; fine_tune.updater 'adam' -> 'sgd'; model.weights changed \(the "
                                          r"weights training starts from\)\); give another name, or overwrite=True") as e:
        claim_run(str(tmp_path), "r", "fit_head", changed)
    assert [k for k, _, _ in e.value.changes] == ["fine_tune.lr", "fine_tune.updater", "model.weights"]
    assert "\n" not in str(e.value)
    assert (tmp_path / "r" / "checkpoint_2026").is_dir()  # refused: nothing changed
    assert json.loads((tmp_path / "r" / RUN_RECORD).read_text())["definition"]["batch_size"] == 32

    assert claim_run(str(tmp_path), "r", "fit_head", changed, overwrite=True) is False  # started again in its place
    assert not (tmp_path / "r" / "checkpoint_2026").exists()
    assert claim_run(str(tmp_path), "r", "fit_head", changed) is True

    (tmp_path / "old" / "checkpoint_1").mkdir(parents=True)  # an older freezeray's run: no record
    with pytest.raises(RunMismatch, match="holds files but no record of what defines it"):
        claim_run(str(tmp_path), "old", "fit_head", definition)


def _checkpoints(folder):
    return sorted(p for p in os.listdir(folder) if p.startswith("checkpoint_"))


def test_fit_head_resumes_the_same_run_and_refuses_another_definition_under_its_name(tiny, tmp_path):
    model, train, storage = tiny["model"], tiny["train"], str(tmp_path)
    first = fit_head(model, train, stopping=Stopping(epochs=3), resources=Resources(num_workers=0),
                     run=Run(storage=storage, name="tour"))
    assert not first.resumed and len(first.history) == 3
    again = fit_head(model, train, stopping=Stopping(epochs=3), resources=Resources(num_workers=0),
                     run=Run(storage=storage, name="tour"))
    assert again.resumed and [h["loss"] for h in again.history] == [h["loss"] for h in first.history]
    longer = fit_head(model, train, stopping=Stopping(epochs=4), resources=Resources(num_workers=0),
                      run=Run(storage=storage, name="tour"))  # epochs: the same run, on
    assert longer.resumed and len(longer.history) == 4
    kept = _checkpoints(tmp_path / "tour")

    for ftc, change in ((FineTuneConfiguration(updater="adam", lr=1e-5, seed=4), "fine_tune.lr 0.05 -> 1e-05"),
                        (FineTuneConfiguration(updater="nesterov", lr=0.05, seed=4), "fine_tune.updater 'adam' -> "
                                                                                      "'nesterov'")):
        other = TransferLearning(model).fine_tune_configuration(ftc).build()
        with pytest.raises(RunMismatch, match=f"run 'tour' at .*{change}"):
            fit_head(other, train, stopping=Stopping(epochs=3), resources=Resources(num_workers=0),
                     run=Run(storage=storage, name="tour"))
    with pytest.raises(RunMismatch, match="batch_size 16 -> 8"):
        fit_head(model, train, stopping=Stopping(epochs=3), batches=Batches(batch_size=8),
                 resources=Resources(num_workers=0), run=Run(storage=storage, name="tour"))
    assert _checkpoints(tmp_path / "tour") == kept  # refusals trained and wrote nothing

    sgd = TransferLearning(model).fine_tune_configuration(FineTuneConfiguration(updater="sgd", lr=0.1)).build()
    replaced = fit_head(sgd, train, stopping=Stopping(epochs=2), resources=Resources(num_workers=0),
                        run=Run(storage=storage, name="tour", overwrite=True))
    assert not replaced.resumed and len(replaced.history) == 2
    assert replaced.history[0]["loss"] != first.history[0]["loss"] or replaced.history[1]["loss"] != first.history[1]["loss"]
    assert not torch.equal(replaced.model.state_dict()["fc2.linear.weight"], first.model.state_dict()["fc2.linear.weight"])
    with pytest.raises(RunMismatch, match="fine_tune.updater 'sgd' -> 'adam'"):  # the record is the new run's now
        fit_head(model, train, stopping=Stopping(epochs=3), resources=Resources(num_workers=0),
                 run=Run(storage=storage, name="tour"))


def test_a_finished_sweep_is_reused_and_another_space_under_its_name_is_refused(tiny, tmp_path):
    from ray import tune

    model, train, storage = tiny["model"], tiny["train"], str(tmp_path)
    space = {"lr": tune.grid_search([0.01, 0.05])}
    first = sweep(model, train, space, tuning=Tuning(scheduler=None), stopping=Stopping(epochs=2),
                  run=Run(storage=storage, name="s"))
    assert not first.reused and len(first.table) == 2
    again = sweep(model, train, space, tuning=Tuning(scheduler=None), stopping=Stopping(epochs=2),
                  run=Run(storage=storage, name="s"))
    assert again.reused and again.best_config == first.best_config
    assert again.table.to_dict("records") == first.table.to_dict("records")
    for k, v in first.best_model.state_dict().items():
        assert torch.equal(again.best_model.state_dict()[k], v), k
    with pytest.raises(RunMismatch, match=r"run 's' at .*space.lr.grid_search \[0.01, 0.05\] -> \[0.01, 0.1\]"):
        sweep(model, train, {"lr": tune.grid_search([0.01, 0.1])}, tuning=Tuning(scheduler=None),
              stopping=Stopping(epochs=2), run=Run(storage=storage, name="s"))
    with pytest.raises(RunMismatch, match="epochs 2 -> 3"):
        sweep(model, train, space, tuning=Tuning(scheduler=None), stopping=Stopping(epochs=3),
              run=Run(storage=storage, name="s"))
