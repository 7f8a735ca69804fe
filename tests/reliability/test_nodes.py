"""Featurization on a real multi-node Ray cluster on this machine (``ray.cluster_utils.
Cluster``: a head that schedules nothing and three worker nodes, each a raylet with its
own resources): actors placed on several nodes write the shards where they run, a node
removed mid-run still gives every row exactly once, and the driver's memory does not grow
with the width of the features (it never receives them).

The cluster runs in a driver subprocess (``ray.init`` happens once per process, and the
test session has its own Ray); it prints its findings as JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a cluster of four raylets, a node killed: still run by make test

ROOT = Path(__file__).resolve().parents[2]

_DRIVER = r"""
import json, os, sys, threading, time
sys.path.insert(0, "tests")
import numpy as np, psutil, torch
import models  # registers the test models
import ray
from ray.cluster_utils import Cluster
import pipeline, surgery
from imagesets import write_image_folder
from pipeline import Resources

work = sys.argv[1]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 200 << 20})
nodes = [cluster.add_node(num_cpus=2, object_store_memory=200 << 20) for _ in range(3)]
ray.init(address=cluster.address, log_to_driver=False)
cluster.wait_for_nodes()
from ray.data import DataContext
ctx = DataContext.get_current()
ctx.enable_progress_bars = False
# Where the work spreads is the point of sections 1, 2 and 4: the pool starts whole, each actor takes one
# call at a time, and the model there (busy_cnn_test, ~10 ms an image) is slower than decoding, so blocks
# queue for the actors. With the tiny model the actors wait for the decode tasks and one of them could
# take every block as it came (seen in CI: every slice from one node).
ctx.wait_for_min_actors_s = 300
ctx.max_tasks_in_flight_per_actor = 1

def images(name, per_class, size):
    root = os.path.join(work, name)
    def put(p, b):
        os.makedirs(os.path.dirname(os.path.join(root, p)), exist_ok=True)
        open(os.path.join(root, p), "wb").write(b)
    write_image_folder(put, per_class=per_class, size=size, seed=5, odd_modes=False)
    return root

def model(name):
    torch.manual_seed(0)
    return surgery.TransferLearning(surgery.zoo.load(name)).set_feature_extractor("flatten").build()

def rows_once(fset, n):
    # read straight from storage: a node just removed may still count as alive for a Ray Data read
    ids = np.concatenate([fset.read(["row_id"]).column("row_id").to_numpy(),
                          np.asarray(fset.errors_table().column("row_id").to_pylist(), dtype=np.int64)])
    counts = np.bincount(ids, minlength=n)
    return {"checked": int(len(ids)), "lost": int((counts == 0).sum()), "duplicated": int((counts > 1).sum())}

out = {"nodes": [n.node_id for n in nodes], "head": cluster.head_node.node_id}

# 1. across nodes: one actor per node, each writing its slices where it runs
src = images("spread", 60, 24)
busy = model("busy_cnn_test")
fset = pipeline.featurize(busy, src, os.path.join(work, "f-spread"), dtype="float32", shard_rows=12)
out["spread"] = {"writers": sorted({n for s in fset.shards for n in s.nodes}), "shards": len(fset.shards),
                 **rows_once(fset, 180)}
direct = surgery.split(busy).frozen.eval()
df = fset.read().to_pandas()
from freezeray.images import preprocess_bytes
from pipeline.decode import normalize
config = surgery.get_info(busy).preprocessing
pixels = np.stack([preprocess_bytes(open(p, "rb").read(), config) for p in df["path"]])
with torch.no_grad():
    expected = direct(normalize(torch.from_numpy(pixels), config)).numpy()
out["spread"]["max_abs_diff"] = float(np.abs(np.stack(df["features"].to_numpy()) - expected).max())

# 2. a node lost mid-run: remove the node of the first shard's writer, then go on
removed = []
def lose_a_node(shard, rows, errors):
    if not removed:
        victim = nodes[1]
        cluster.remove_node(victim, allow_graceful=False)
        removed.append(victim.node_id)
src = images("lost", 80, 24)
started = time.monotonic()
fset = pipeline.featurize(busy, src, os.path.join(work, "f-lost"), dtype="float32", shard_rows=10,
                          progress=lose_a_node)
out["lost"] = {"removed": removed, "seconds": time.monotonic() - started, "shards": len(fset.shards),
               "writers": sorted({n for s in fset.shards for n in s.nodes}), **rows_once(fset, 240)}
cluster.add_node(num_cpus=2, object_store_memory=200 << 20)
cluster.wait_for_nodes()

# 3. the driver's memory and what it receives, featurizing narrow (64 values a row) and very wide rows (1,048,576)
import importlib
tracker = importlib.import_module("pipeline.shards").Tracker
received, add = [0], tracker.add
def counting_add(self, batch):  # every batch the driver reads from Ray Data
    received[0] += sum(np.asarray(v).nbytes if np.asarray(v).dtype != object else
                       sum(len(str(x).encode()) for x in np.asarray(v).ravel()) for v in batch.values())
    return add(self, batch)
tracker.add = counting_add
proc = psutil.Process()
src = images("width", 36, 32)
for name in ("tiny_cnn_test", "wide_cnn_test"):
    m = model(name)
    base, received[0] = proc.memory_info().rss, 0
    peak = [base]
    stop = threading.Event()
    def sample():
        while not stop.wait(0.02):
            peak.append(proc.memory_info().rss)
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    fset = pipeline.featurize(m, src, os.path.join(work, f"f-{name}"), shard_rows=8)
    stop.set()
    t.join()
    out[name] = {"width": int(np.prod(fset.feature_shape)), "feature_bytes": int(sum(s.bytes for s in fset.shards)),
                 "driver_growth": int(max(peak) - base), "received": received[0], **rows_once(fset, 108)}
# 4. tar shards across the nodes: one read task per shard wherever it runs, actors on several nodes
from sharded import chunks, images as sharded_images, key_of, tar_bytes
tars = os.path.join(work, "wds")
os.makedirs(tars)
blobs = {}
for i, part in enumerate(chunks(sharded_images(per_class=160, size=16, seed=6, bad=False), 20)):  # 4 actor calls of 128
    open(os.path.join(tars, f"{i:05d}.tar"), "wb").write(tar_bytes(part))
    blobs.update({f"{tars}/{i:05d}.tar#{key_of(rel)}": data for rel, (data, _) in part.items()})
fset = pipeline.featurize(busy, tars, os.path.join(work, "f-tars"), dtype="float32")
ids = np.concatenate([fset.read(["row_id"]).column("row_id").to_numpy(),
                      np.asarray(fset.errors_table().column("row_id").to_pylist(), dtype=np.int64)])
df = fset.read().to_pandas()
pixels = np.stack([preprocess_bytes(blobs[p], config) for p in df["path"]])
with torch.no_grad():
    expected = direct(normalize(torch.from_numpy(pixels), config)).numpy()
out["tars"] = {"shards": len(fset.shards), "writers": sorted({n for s in fset.shards for n in s.nodes}),
               "checked": int(len(ids)), "unique": int(len(set(ids.tolist()))), "expected": len(blobs),
               "max_abs_diff": float(np.abs(np.stack(df["features"].to_numpy()) - expected).max())}
print("RESULT " + json.dumps(out), flush=True)
ray.shutdown()
cluster.shutdown()
"""


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("nodes")
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(ROOT / "tests")}
    env.pop("RAY_ADDRESS")
    proc = subprocess.run([sys.executable, "-c", _DRIVER, str(work)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


def test_actors_on_several_nodes_write_the_shards_where_they_run(cluster_run, ledger):
    spread = cluster_run["spread"]
    assert len(spread["writers"]) >= 2 and set(spread["writers"]) <= set(cluster_run["nodes"])
    assert cluster_run["head"] not in spread["writers"]  # the head schedules nothing
    assert (spread["checked"], spread["lost"], spread["duplicated"]) == (180, 0, 0) and spread["shards"] == 15
    assert spread["max_abs_diff"] < 1e-4
    ledger(tried="featurizing 180 images on a cluster of a head and three worker nodes",
           checked=f"slices written by {len(spread['writers'])} nodes (not the head, not the driver); all rows once, "
                   "features equal a direct computation", rows_checked=spread["checked"], rows_lost=spread["lost"])


def test_a_node_removed_mid_run_still_gives_every_row_once(cluster_run, ledger):
    lost = cluster_run["lost"]
    assert lost["removed"] and lost["shards"] == 24
    assert (lost["checked"], lost["lost"], lost["duplicated"]) == (240, 0, 0)
    ledger(tried="a worker node removed (its raylet killed) after the first of 24 shards", faults=1,
           checked=f"Ray Data rescheduled the lost node's work on the others (slices written by {len(lost['writers'])} "
                   f"nodes, the lost one's before it went); every row once ({lost['seconds']:.0f}s)",
           rows_checked=lost["checked"], rows_lost=lost["lost"])


def test_the_drivers_memory_does_not_grow_with_the_feature_width(cluster_run, ledger):
    narrow, wide = cluster_run["tiny_cnn_test"], cluster_run["wide_cnn_test"]
    assert narrow["width"] == 64 and wide["width"] == 1024 * 32 * 32
    assert wide["feature_bytes"] > 180 * 2**20  # 108 rows of 2 MiB went to storage...
    # ...without passing through the driver: it reads the same few bytes a row (row ids, slice names) for both
    assert wide["received"] < 2 * narrow["received"] + 4096 and wide["received"] < wide["feature_bytes"] / 1000
    # its memory grows by the trace check of the model on sample batches (in the driver: ~75 MiB for the wide
    # model, whatever the row count), not by the rows
    assert wide["driver_growth"] < wide["feature_bytes"] / 2
    for r in (narrow, wide):
        assert (r["checked"], r["lost"], r["duplicated"]) == (108, 0, 0)
    ledger(tried=f"108 rows of {narrow['width']} and of {wide['width']:,} values ({wide['feature_bytes'] / 2**20:.0f} MiB)",
           checked=f"the driver received {narrow['received'] / 108:.0f} and {wide['received'] / 108:.0f} bytes a row, "
                   f"grew by {narrow['driver_growth'] / 2**20:.0f} MiB and {wide['driver_growth'] / 2**20:.0f} "
                   "MiB: the features never reach it", rows_checked=216)


def test_tar_shards_on_several_nodes_give_every_sample_once(cluster_run, ledger):
    tars = cluster_run["tars"]
    assert tars["shards"] == 24 and len(tars["writers"]) >= 2 and cluster_run["head"] not in tars["writers"]
    assert tars["checked"] == tars["unique"] == tars["expected"] == 480 and tars["max_abs_diff"] < 1e-4
    ledger(tried="featurizing 24 WebDataset tar shards (480 samples) on a cluster of three worker nodes",
           checked=f"rows computed on {len(tars['writers'])} nodes; every sample once, features equal a direct computation",
           rows_checked=tars["checked"], rows_lost=tars["expected"] - tars["unique"])
