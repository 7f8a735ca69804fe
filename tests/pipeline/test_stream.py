"""Streaming head training: each Ray Train worker reads its own shards of a feature set
from storage; every row once per epoch, in lockstep, resumable at any checkpointed step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.stream import StreamPlan, stream_batches, validation_batches

ROOT = Path(__file__).resolve().parents[2]


def _write_shards(root: Path, sizes: list[int], width: int = 8) -> list[tuple[str, int]]:
    """Parquet shards of ``sizes`` rows whose features encode their row ids."""
    import pyarrow as pa

    from pipeline.shards import to_arrow_columns, write_table

    out, start = [], 0
    for i, n in enumerate(sizes):
        ids = np.arange(start, start + n, dtype=np.int64) + (i << 32)
        feats = np.repeat(ids[:, None].astype(np.float32) % 100_000, width, axis=1)
        uri = str(root / f"s{i}.parquet")
        write_table(uri, pa.table(to_arrow_columns({"row_id": ids, "label": (ids % 3).astype(np.int32), "features": feats})),
                    None)
        out.append((uri, n))
        start += n
    return out


def _plan(shards, workers=2, batch=16, buffer=40, validation=()) -> StreamPlan:
    return StreamPlan(None, tuple(shards), tuple(validation), ("features",), ((8,),), workers, batch, seed=5,
                      buffer_rows=buffer, checkpoint_steps=3)


def _rows(plan: StreamPlan, epoch: int, rank: int, start: int = 0) -> list[list[int]]:
    from pipeline.stream import LastBatch

    last, out = LastBatch(), []
    for x, y in stream_batches(plan, epoch, rank, start, last=last):
        assert x[0].shape[0] == y.shape[0] == len(last.ids)
        out.append(list(last.ids))
    return out


def test_every_row_once_per_epoch_in_lockstep_with_a_fresh_order_each_epoch(tmp_path):
    shards = _write_shards(tmp_path, [30, 7, 55, 12, 40, 1, 23])
    plan = _plan(shards)
    all_ids = {int(v) for uri, _ in shards for v in __import__("pyarrow.parquet", fromlist=["x"]).read_table(uri)["row_id"].to_pylist()}
    orders = []
    for epoch in (0, 1):
        per_rank = [_rows(plan, epoch, r) for r in range(plan.workers)]
        assert {len(b) for b in per_rank} == {plan.steps(epoch)}  # the same number of steps on every worker
        ids = [i for batches in per_rank for b in batches for i in b]
        assert sorted(ids) == sorted(all_ids)  # every row once, none twice, none left out
        loads = [sum(len(b) for b in batches) for batches in per_rank]
        assert max(loads) - min(loads) <= max(n for _, n in shards)  # dealt to the lighter worker
        orders.append(ids)
    assert orders[0] != orders[1]  # a new permutation of shards and rows every epoch
    assert _rows(plan, 1, 0) == _rows(plan, 1, 0)  # and the same one on a rerun


def test_a_stream_resumed_at_a_step_gives_the_rest_of_the_epoch(tmp_path):
    plan = _plan(_write_shards(tmp_path, [30, 7, 55, 12, 40, 1, 23]))
    for rank in range(plan.workers):
        whole = _rows(plan, 2, rank)
        for start in (1, 3, len(whole) - 1):  # inside a group, at a group boundary, the last step
            assert _rows(plan, 2, rank, start) == whole[start:]


def test_validation_shards_are_held_out_and_split_between_workers(tmp_path):
    shards = _write_shards(tmp_path, [20, 20, 20, 20, 20])
    plan = _plan(shards[:3], validation=shards[3:])
    got = [int(y.shape[0]) for r in range(2) for _, y in validation_batches(plan, r)]
    assert sum(got) == 40
    train_ids = {i for r in range(2) for b in _rows(plan, 0, r) for i in b}
    assert len(train_ids) == 60


_JOB = r"""
import json, os, sys, threading, time
sys.path.insert(0, "tests")
os.environ["FREEZERAY_WORKER_MEMORY_BYTES"] = "1"  # stream whatever the size
import numpy as np, psutil, ray, torch
ray.init(address="local", num_cpus=2, object_store_memory=80 << 20, include_dashboard=False, log_to_driver=False)
import surgery, pipeline
from surgery import TransferLearning, FineTuneConfiguration
from surgery.layers import Output
from benchmarks.head import synthetic_features
from benchmarks.scale import MemorySampler
work = sys.argv[1]
torch.manual_seed(0)
model = (TransferLearning(surgery.zoo.load("efficientnet_lite0")).fine_tune_configuration(FineTuneConfiguration(seed=1))
         .set_feature_extractor("global_pool").remove_vertex_keep_connections("classifier")
         .add_layer("classifier", Output(4)).build())
out, weights = {}, []
for run, rows in (("small", int(sys.argv[2])), ("large", int(sys.argv[3])), ("small-again", int(sys.argv[2]))):
    fset = synthetic_features(model, os.path.join(work, f"f{rows}"), rows=rows, rows_per_shard=4096) if run != "small-again" else fset_small
    fset_small = fset if run == "small" else globals().get("fset_small")
    with MemorySampler(period=0.1) as mem:
        base = mem._me.memory_info().rss
        r = pipeline.fit_head(model, fset, stopping=pipeline.Stopping(epochs=1),
                              resources=pipeline.Resources(num_workers=2),
                              run=pipeline.Run(storage=os.path.join(work, "runs"), name=run))
    out[run] = {"driver_growth": mem.driver - base, "worker_peak": mem.worker_max, "rows": [h["rows"] for h in r.history],
                "mode": r.mode, "feature_bytes": sum(s.bytes for s in fset.shards)}
    if run != "large":
        weights.append(surgery.split(r.model).unfrozen.state_dict())
out["object_store"] = ray.cluster_resources()["object_store_memory"]
out["same_weights"] = all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
print("RESULT " + json.dumps(out), flush=True)
"""


@pytest.mark.slow
def test_a_feature_set_larger_than_the_object_store_streams_with_bounded_memory(tmp_path):
    small, large = 20_000, 160_000  # 1,280 float16 values a row: 51 and 410 MB of shards; the object store: 80 MB
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", _JOB, str(tmp_path), str(small), str(large)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = json.loads(lines[-1].removeprefix("RESULT "))
    assert out["large"]["feature_bytes"] > 4 * out["object_store"]
    for run, rows in (("small", small), ("large", large), ("small-again", small)):
        r = out[run]
        assert r["mode"] == "workers" and r["rows"] == [rows]  # every row of the set
        assert r["driver_growth"] < 100 << 20  # the driver never holds the features
    # a worker holds two groups of rows whatever the set: 8x the rows, (nearly) the same peak
    assert out["large"]["worker_peak"] < 1.25 * out["small"]["worker_peak"]
    assert out["same_weights"]  # the same seed and data: the same weights
