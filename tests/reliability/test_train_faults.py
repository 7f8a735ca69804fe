"""Faults during training: a Ray Train worker killed mid-epoch, the run restarted with the
same name, and partial or corrupt checkpoints, which are detected and skipped for the
newest good one."""

from __future__ import annotations

import hashlib
import json
import os
import sys

import pytest
import ray.cloudpickle as cloudpickle
import torch
from imagesets import write_image_folder

import surgery
from pipeline import Batches, Resources, Run, Stopping, featurize, fit_head
from pipeline.checkpoints import (
    CheckpointError,
    RunFolder,
    checkpoint_files,
    read_folder,
    resume_from_ray,
    write_folder,
)
from surgery import FineTuneConfiguration, TransferLearning
from surgery.layers import Output
from surgery.training import TrainState

pytestmark = pytest.mark.slow  # processes killed, servers stopped: minutes, still run by make test

# the callbacks below run inside Ray Train workers, which cannot import this test module
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class _Events:
    """Kills the worker process once at (epoch, step) (the process dies: no exception),
    and writes every epoch_end and resume event of rank 0 to a JSON-lines file."""

    def __init__(self, path: str, kill_at: tuple[int, int] | None = None) -> None:
        self.path, self.kill_at = path, kill_at

    def __call__(self, event: dict) -> None:
        if event["event"] == "batch_end" and self.kill_at == (event["epoch"], event["step"]) \
                and not os.path.exists(self.path + ".killed"):
            open(self.path + ".killed", "w").close()
            os._exit(1)
        if event["event"] in ("epoch_end", "resume") and event["rank"] == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps({k: v for k, v in event.items() if k != "metrics"}) + "\n")

    def read(self) -> list[dict]:
        with open(self.path) as f:
            return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def head_job(ray_session, tmp_path_factory, tiny_name):
    root = tmp_path_factory.mktemp("train-faults")

    def put(path, data):
        (root / "imgs" / path).parent.mkdir(parents=True, exist_ok=True)
        (root / "imgs" / path).write_bytes(data)

    write_image_folder(put, per_class=20, size=20, seed=9, odd_modes=False)
    torch.manual_seed(0)
    model = (TransferLearning(surgery.zoo.load(tiny_name))
             .fine_tune_configuration(FineTuneConfiguration(updater="adam", lr=1e-2, seed=3))
             .set_feature_extractor("flatten").remove_vertex_keep_connections("fc2")
             .add_layer("fc2", Output(3, loss="cross_entropy")).build())
    features = featurize(model, str(root / "imgs"), str(root / "features"), dtype="float32", resources=Resources(cpus_per_worker=0.5))
    return model, features


def _checkpoints(run_dir: str) -> list[str]:
    return sorted(os.path.join(run_dir, d) for d in os.listdir(run_dir)
                  if d.startswith("checkpoint_") and os.path.isdir(os.path.join(run_dir, d)))


def test_killed_worker_restart_by_name_and_a_corrupt_checkpoint(head_job, tmp_path, ledger):
    model, features = head_job
    storage = str(tmp_path / "runs")
    events = _Events(str(tmp_path / "events.jsonl"), kill_at=(1, 2))
    first = fit_head(model, features, stopping=Stopping(epochs=3), batches=Batches(batch_size=8),
                     resources=Resources(num_workers=1),
                     run=Run(storage=storage, name="r", max_failures=1, callback=events))
    assert os.path.exists(events.path + ".killed") and [h["epoch"] for h in first.history] == [0, 1, 2]
    resumed = [e for e in events.read() if e["event"] == "resume"]
    assert len(resumed) == 1 and resumed[0]["epoch"] == 0 and resumed[0]["skipped"] == []  # after the kill

    newest, previous = _checkpoints(os.path.join(storage, "r"))[-1], _checkpoints(os.path.join(storage, "r"))[-2]
    weights = os.path.join(newest, "model.safetensors")
    data = bytearray(open(weights, "rb").read())
    data[-7] ^= 0xFF  # one flipped byte in a tensor: safetensors still parses it
    open(weights, "wb").write(bytes(data))

    events = _Events(str(tmp_path / "events2.jsonl"))
    again = fit_head(model, features, stopping=Stopping(epochs=4), batches=Batches(batch_size=8),
                     resources=Resources(num_workers=1), run=Run(storage=storage, name="r", callback=events))
    seen = events.read()
    assert seen[0]["event"] == "resume" and seen[0]["epoch"] == 1 and seen[0]["checkpoint"] == previous
    assert len(seen[0]["skipped"]) == 1 and "model.safetensors does not match its digest" in seen[0]["skipped"][0]
    assert [e["epoch"] for e in seen[1:]] == [2, 3]  # epoch 2 again (its checkpoint was bad), then the new one
    assert [h["epoch"] for h in again.history] == [0, 1, 2, 3] and again.history[:2] == first.history[:2]
    ledger(tried="a Ray Train worker killed with os._exit mid-epoch (max_failures=1); the run started again by name "
                 "after a byte of its newest checkpoint was flipped", faults=2,
           checked="the killed run resumed from its epoch-0 checkpoint; the restart skipped the corrupt checkpoint "
                   "for the one before it and re-ran only the epochs after it")


def test_partial_corrupt_and_pickled_checkpoints_are_detected(tmp_path, ledger):
    import ray.train

    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    run = tmp_path / "run"
    for epoch in range(3):
        d = run / f"checkpoint_2026-11-27_10-00-0{epoch}.000000"
        d.mkdir(parents=True)
        state = TrainState(epoch=epoch + 1, best=1.0, best_epoch=0, best_weights=model.state_dict())
        write_folder(str(d), checkpoint_files(model, opt, sched, state))
    c0, c1, c2 = _checkpoints(str(run))
    assert read_folder(c2)[1].epoch == 3

    os.remove(os.path.join(c2, "meta.json"))  # partial: the run died before meta.json was written
    with pytest.raises(CheckpointError, match="meta.json is missing"):
        read_folder(c2)

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"optimizer": Evil()}, os.path.join(c1, "state.pt"))  # a pickle with code in it...
    meta = json.load(open(os.path.join(c1, "meta.json")))
    meta["files"]["state.pt"] = {"bytes": os.path.getsize(os.path.join(c1, "state.pt")),  # ...and a matching digest
                                 "sha256": hashlib.sha256(open(os.path.join(c1, "state.pt"), "rb").read()).hexdigest()}
    json.dump(meta, open(os.path.join(c1, "meta.json"), "w"))
    with pytest.raises(CheckpointError, match="cannot load: UnpicklingError"):
        read_folder(c1)
    assert not (tmp_path / "pwned").exists()

    # workers resume from Ray Train's latest checkpoint; local mode from the run folder: both skip the bad ones
    (weights, state, _, _), used, skipped = resume_from_ray(ray.train.Checkpoint(c2))
    assert used == c0 and state.epoch == 1 and len(skipped) == 2
    assert torch.equal(weights["weight"], model.state_dict()["weight"])
    (_, local_state, _, _), local_used, local_skipped = RunFolder(str(tmp_path), "run").resume_point()
    assert local_used == c0 and local_state.epoch == 1 and len(local_skipped) == 2
    with open(os.path.join(c0, "model.safetensors"), "r+b") as f:
        f.truncate(10)
    with pytest.raises(CheckpointError, match="no usable checkpoint to resume from"):
        resume_from_ray(ray.train.Checkpoint(c2))
    with pytest.raises(CheckpointError, match="no usable checkpoint to resume from"):
        RunFolder(str(tmp_path), "run").resume_point()
    ledger(tried="a checkpoint without meta.json, one whose state.pt is a pickle with code (digest forged to match), "
                 "one truncated; resumed as Ray Train workers and as local mode would", faults=3,
           checked="each is refused with its reason, the code never runs, resume falls back to the newest good one "
                   "and fails clearly when none is left")


class _RowLog:
    """Writes the row ids of every batch of every worker (and each resume) to a JSON-lines
    file, and kills rank 0's process once at (epoch, step)."""

    def __init__(self, path: str, kill_at: tuple[int, int]) -> None:
        self.path, self.kill_at = path, kill_at
        self.life: int | None = None  # per worker process, from its first event: the other rank's last
        # batch of the killed life, logged after the kill, is still that life's

    def __call__(self, event: dict) -> None:
        if self.life is None:
            self.life = int(os.path.exists(self.path + ".killed"))
        life = self.life
        if event["event"] == "batch_end":
            with open(self.path, "a") as f:
                f.write(json.dumps({"life": life, "epoch": event["epoch"], "step": event["step"], "rank": event["rank"],
                                    "rows": event["row_ids"]}) + "\n")
            if event["rank"] == 0 and (event["epoch"], event["step"]) == self.kill_at and not life:
                open(self.path + ".killed", "w").close()
                os._exit(1)
        elif event["event"] == "resume" and event["rank"] == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps({"resume": True, "epoch": event["epoch"] + 1, "step": event["step"]}) + "\n")


def test_a_worker_killed_mid_epoch_of_a_streamed_run_resumes_at_its_step_and_trains_every_row_once(
        ray_session, tmp_path, monkeypatch, ledger):
    from benchmarks.head import synthetic_features

    monkeypatch.setenv("FREEZERAY_WORKER_MEMORY_BYTES", "1")  # stream whatever the size
    monkeypatch.setenv("FREEZERAY_STREAM_CHECKPOINT_SHARDS", "3")
    torch.manual_seed(0)
    model = (TransferLearning(surgery.zoo.load("efficientnet_lite0")).fine_tune_configuration(FineTuneConfiguration(seed=2))
             .set_feature_extractor("global_pool").remove_vertex_keep_connections("classifier")
             .add_layer("classifier", Output(4)).build())
    fset = synthetic_features(model, str(tmp_path / "f"), rows=6000, rows_per_shard=300)  # 20 shards
    log = str(tmp_path / "rows.jsonl")
    result = fit_head(model, fset, stopping=Stopping(epochs=3), batches=Batches(batch_size=64),
                      resources=Resources(num_workers=2),
                      run=Run(storage=str(tmp_path / "runs"), name="stream", max_failures=1, callback=_RowLog(log, kill_at=(1, 12))))
    lines = [json.loads(line) for line in open(log)]
    resumes = [x for x in lines if x.get("resume")]
    assert len(resumes) == 1 and os.path.exists(log + ".killed")
    epoch, step = resumes[0]["epoch"], resumes[0]["step"]
    assert epoch == 1 and 0 < step <= 12  # resumed inside the epoch the worker died in, at its last checkpoint
    every = {int(i) for i in fset.read(["row_id"]).column("row_id").to_numpy()}
    checked = 0
    for e in range(3):
        batches = [x for x in lines if not x.get("resume") and x["epoch"] == e]
        kept = [x for x in batches if (x["life"] == 0 and (e < epoch or (e == epoch and x["step"] < step)))
                or (x["life"] == 1 and (e > epoch or (e == epoch and x["step"] >= step)))]
        rows = [r for x in kept for r in x["rows"]]
        assert sorted(rows) == sorted(every), f"epoch {e}: rows trained twice or skipped"
        checked += len(rows)
    assert [h["rows"] for h in result.history] == [6000, 6000, 6000]
    ledger(tried="a Ray Train worker killed in the middle of epoch 1 of a run streaming 20 shards to 2 workers",
           faults=1, checked=f"Ray Train restarted the workers from the checkpoint at step {step} of that epoch; every "
                             "row trained exactly once in each of the 3 epochs", rows_checked=checked, rows_lost=0)
