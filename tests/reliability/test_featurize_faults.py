"""Faults during featurization: a model actor killed, the driver killed, the S3 server
stopped and restarted mid-write, and the S3 server staying down. Each run ends with every
input row exactly once (a feature row or an error row) and the features equal to a direct
computation, or with a clear failure and nothing committed.

These cases use an S3 server of their own, which they stop and restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from imagesets import write_image_folder
from ledger import account, direct_features
from outputs import sealed_shards
from services import S3Server

import surgery
from freezeray import storage
from pipeline import FeatureSet, Resources, featurize
from surgery import TransferLearning

pytestmark = pytest.mark.slow  # processes killed, servers stopped: minutes, still run by make test

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server.start(tmp_path_factory.mktemp("fault-s3"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def images(s3):
    """240 generated images on the fault server, and their bytes by URI."""
    fs = s3.filesystem()
    bucket = s3.make_bucket("fault-images")
    files = {}

    def put(path, data):
        fs.pipe(f"{bucket}/set/{path}", data)
        files[f"s3://{bucket}/set/{path}"] = data

    write_image_folder(put, per_class=80, size=32, seed=7, odd_modes=False)
    return f"s3://{bucket}/set", files


@pytest.fixture(scope="module")
def model(tiny_name):
    torch.manual_seed(0)
    return TransferLearning(surgery.zoo.load(tiny_name)).set_feature_extractor("flatten").build()


def _check_complete(fset, files, model, expected=None):
    """Every input exactly once, features equal to the frozen part applied directly."""
    checked, lost, duplicated = account(fset, len(files), expected)
    assert (checked, lost, duplicated) == (len(files), 0, 0)
    assert fset.errors == 0, fset.errors_table().column("reason").to_pylist()[:5]
    df = fset.to_dataset().to_pandas()
    expected = direct_features(model, [files[p] for p in df["path"]])
    np.testing.assert_allclose(np.stack(df["features"].to_numpy()), expected, rtol=1e-4, atol=1e-5)
    return checked, lost


def _featurizer_pids() -> set[int]:
    pids = set()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if "Featurizer" in " ".join(proc.info["cmdline"] or []):
                pids.add(proc.info["pid"])
        except psutil.Error:
            continue
    return pids


def test_a_model_actor_killed_mid_run_loses_and_duplicates_nothing(ray_session, s3, images, model, ledger):
    source, files = images
    out = "s3://fault-images/killed-actor"
    seen, killed, shards = set(), [], []
    stop = threading.Event()

    def watch():  # which Featurizer processes ever existed
        while not stop.wait(0.05):
            seen.update(_featurizer_pids())

    def kill_after_first_shard(shard, rows, errors):
        shards.append(shard)
        if len(shards) == 1:
            for pid in _featurizer_pids():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        fset = featurize(model, source, out, storage_options=s3.storage_options, dtype="float32", shard_rows=12,
                         batch_size=8, decode_batch_size=8, resources=Resources(cpus_per_worker=0.5), progress=kill_after_first_shard)
    finally:
        stop.set()
        watcher.join()
    assert killed and len(shards) == len(fset.shards) == 20
    assert seen - set(killed), "Ray did not start a replacement actor"
    checked, lost = _check_complete(fset, files, model)
    ledger(tried="SIGKILL of the model actor after 1 of 20 shards", faults=len(killed),
           checked="Ray restarted the actor; all rows once, features equal a direct computation",
           rows_checked=checked, rows_lost=lost)


_DRIVER = """
import json, os, sys, time
sys.path.insert(0, "tests")
import models  # registers the test model the saved recipe names
import ray, surgery, pipeline
cfg = json.loads(os.environ["FREEZERAY_TEST_JOB"])
ray.init(address=cfg["address"], log_to_driver=False)
model = surgery.load(cfg["model"])
pipeline.featurize(model, cfg["source"], cfg["output"], storage_options=cfg["storage_options"], dtype="float32",
                   shard_rows=12, resources=pipeline.Resources(cpus_per_worker=0.5), progress=lambda s, r, e: time.sleep(0.5))
print("FINISHED")
"""


def _start_driver(model, source: str, out: str, s3, tmp_path) -> subprocess.Popen:
    """A featurize of ``source`` into ``out`` in a driver process of its own, on the session's Ray."""
    import ray

    surgery.save(model, str(tmp_path / "model"))
    env = {**os.environ, "FREEZERAY_TEST_JOB": json.dumps({
        "address": ray.get_runtime_context().gcs_address, "model": str(tmp_path / "model"), "source": source,
        "output": out, "storage_options": s3.storage_options})}
    return subprocess.Popen([sys.executable, "-c", _DRIVER], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


def test_a_driver_killed_mid_run_is_resumed_from_its_committed_shards(ray_session, s3, images, model, tmp_path,
                                                                      ledger):
    source, files = images
    out = "s3://fault-images/killed-driver"
    driver = _start_driver(model, source, out, s3, tmp_path)
    fs = s3.filesystem()
    deadline = time.monotonic() + 180
    try:
        while len(fs.glob("fault-images/killed-driver/shards/*.parquet")) < 4:
            assert driver.poll() is None, driver.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the driver wrote no shards in time"
            time.sleep(0.1)
            fs.invalidate_cache()
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(30)
    fs.invalidate_cache()
    before = set(sealed_shards(out, s3.storage_options))
    assert 4 <= len(before) < 20 and fs.exists("fault-images/killed-driver/_lock.json")
    with pytest.raises(FileNotFoundError, match="no committed feature set"):
        FeatureSet.open(out, s3.storage_options)

    written = []
    fset = featurize(surgery.load(str(tmp_path / "model")), source, out, storage_options=s3.storage_options,
                     dtype="float32", shard_rows=12, resources=Resources(cpus_per_worker=0.5), progress=lambda s, r, e: written.append(s))
    assert set(written).isdisjoint(before)
    assert len(written) + len(before) == len(fset.shards) == 20
    assert not fs.exists("fault-images/killed-driver/_lock.json")  # the dead driver's lease was taken over, then released
    checked, lost = _check_complete(fset, files, model)
    ledger(tried=f"SIGKILL of the driver process after {len(before)} of 20 shards", faults=1,
           checked="the next run took over the dead driver's lease and wrote only the missing shards; all rows once",
           rows_checked=checked, rows_lost=lost)


@pytest.fixture(scope="module")
def tar_images(s3):
    """240 generated images in 20 WebDataset tars of 12 on the fault server, and their bytes by row path."""
    from sharded import chunks, images, key_of, tar_bytes

    fs = s3.filesystem()
    bucket = s3.make_bucket("fault-tars")
    files = {}
    for i, part in enumerate(chunks(images(per_class=80, size=32, seed=7, bad=False), 12)):
        fs.pipe(f"{bucket}/wds/{i:05d}.tar", tar_bytes(part))
        files.update({f"s3://{bucket}/wds/{i:05d}.tar#{key_of(rel)}": data for rel, (data, _) in part.items()})
    return f"s3://{bucket}/wds", files


def test_a_driver_killed_mid_run_over_tar_shards_resumes_by_shard(ray_session, s3, tar_images, model, tmp_path, ledger):
    source, files = tar_images
    out = "s3://fault-tars/killed-driver"
    driver = _start_driver(model, source, out, s3, tmp_path)
    deadline = time.monotonic() + 180
    try:
        while len(sealed_shards(out, s3.storage_options)) < 4:
            assert driver.poll() is None, driver.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the driver sealed no shards in time"
            time.sleep(0.1)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(30)
    before = set(sealed_shards(out, s3.storage_options))
    assert 4 <= len(before) < 20
    with pytest.raises(FileNotFoundError, match="no committed feature set"):
        FeatureSet.open(out, s3.storage_options)
    written = []
    fset = featurize(surgery.load(str(tmp_path / "model")), source, out, storage_options=s3.storage_options,
                     dtype="float32", resources=Resources(cpus_per_worker=0.5), progress=lambda s, r, e: written.append(s))
    assert set(written).isdisjoint(before) and len(written) + len(before) == len(fset.shards) == 20
    expected = np.asarray([s << 32 | i for s in range(20) for i in range(12)])
    checked, lost = _check_complete(fset, files, model, expected)
    ledger(tried=f"SIGKILL of the driver after {len(before)} of 20 tar shards", faults=1,
           checked="the rerun took over the lease and computed only the 20 - "
                   f"{len(before)} unfinished tar shards; all rows once, features equal a direct computation",
           rows_checked=checked, rows_lost=lost)


def test_s3_stopped_and_restarted_mid_write_is_retried_to_success(ray_session, s3, images, model, capfd, ledger):
    source, files = images
    out = "s3://fault-images/outage"
    outages = []

    def outage_after_first_shard(shard, rows, errors):
        if not outages:
            s3.stop()  # the actors' next writes and the read tasks' reads now fail
            outages.append(s3.restart_after(2.0))

    fset = featurize(model, source, out, storage_options=s3.storage_options, dtype="float32", shard_rows=12,
                     resources=Resources(cpus_per_worker=0.5), progress=outage_after_first_shard)
    down = outages[0].result(timeout=120)
    # the writes happen in the model actors: their retries reach this terminal as Ray worker output, and Ray's
    # session logs in any case (forwarding to the terminal can lag or be deduplicated)
    logs = Path(ray_session._private.worker._global_node.get_session_dir_path()) / "logs"
    deadline, seen, retried = time.monotonic() + 15, "", []
    while not retried and time.monotonic() < deadline:
        time.sleep(0.5)
        seen += "".join(capfd.readouterr())
        logged = "".join(f.read_text(errors="replace") for f in logs.glob("worker-*") if f.is_file())
        hit = [[line for line in text.splitlines()
                if "retrying" in line and ("fault-images/outage" in line or "fault-images/set" in line)]
               for text in (logged, seen)]
        retried = hit[0] or hit[1]  # one source, so each retry counts once
    assert retried, "no write or read hit the outage"
    checked, lost = _check_complete(fset, files, model)
    ledger(tried=f"the S3 server stopped after 1 of 20 shards and restarted {down:.0f}s later", faults=1,
           checked=f"{len(retried)} retried storage calls in the actors and read tasks, then success; all rows once, "
                   "features equal a direct computation", rows_checked=checked, rows_lost=lost)


def test_s3_that_stays_down_fails_clearly_and_commits_nothing(ray_session, s3, model, tmp_path, monkeypatch, ledger):
    root = tmp_path / "images"
    files = {}

    def put(path, data):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
        files[str(root / path)] = data

    write_image_folder(put, per_class=20, size=24, seed=3, odd_modes=False)
    out = "s3://fault-images/down"
    monkeypatch.setenv("FREEZERAY_IO_RETRY_SECONDS", "3")
    first = []

    def down_after_first_shard(shard, rows, errors):
        first.append(shard)
        if len(first) == 1:
            s3.stop()

    started = time.monotonic()
    with pytest.raises(storage.StorageUnavailable, match=r"storage unavailable while trying to .* tries over"):
        featurize(model, str(root), out, storage_options=s3.storage_options, dtype="float32", shard_rows=6,
                  resources=Resources(cpus_per_worker=0.5), progress=down_after_first_shard)
    failed_after = time.monotonic() - started
    s3.restart()
    with pytest.raises(FileNotFoundError, match="no committed feature set"):
        FeatureSet.open(out, s3.storage_options)
    kept = set(sealed_shards(out, s3.storage_options))
    assert first[0] in kept  # what was sealed before the outage is kept
    written = []
    fset = featurize(model, str(root), out, storage_options=s3.storage_options, dtype="float32", shard_rows=6,
                     resources=Resources(cpus_per_worker=0.5), progress=lambda s, r, e: written.append(s))
    assert sorted(written) == sorted(set(range(10)) - set(kept)) and len(fset.shards) == 10
    checked, lost = _check_complete(fset, files, model)
    ledger(tried="the S3 server stopped for good after 1 of 10 shards (retry window 3 s)", faults=1,
           checked=f"a StorageUnavailable error after {failed_after:.0f}s, nothing committed; the next run kept the "
                   f"{len(kept)} shards written before and wrote only the other {len(written)}; all rows once",
           rows_checked=checked, rows_lost=lost)
