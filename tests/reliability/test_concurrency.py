"""Concurrency: two featurizations writing to the same output at once cannot both commit;
the loser gets a clear error and the winner's output is intact. The lease behind it is
taken over only from jobs that are gone."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from imagesets import write_image_folder
from ledger import account, direct_features

import surgery
from freezeray import storage
from pipeline import FeatureSet, Resources, featurize
from pipeline.lease import LEASE, LeaseHeld, LeaseLost, OutputLease
from surgery import TransferLearning


def test_two_featurizations_racing_for_one_output_commit_once(ray_session, s3_server, s3_bucket, storage_options,
                                                               tiny_name, ledger):
    fs = s3_server.filesystem()
    files = {}

    def put(path, data):
        fs.pipe(f"{s3_bucket}/set/{path}", data)
        files[f"s3://{s3_bucket}/set/{path}"] = data

    write_image_folder(put, per_class=30, size=24, seed=5, odd_modes=False)
    torch.manual_seed(0)
    model = TransferLearning(surgery.zoo.load(tiny_name)).set_feature_extractor("flatten").build()
    out = f"s3://{s3_bucket}/features"
    start = threading.Barrier(2)

    def job(dtype):
        start.wait()
        try:
            return featurize(model, f"s3://{s3_bucket}/set", out, storage_options=storage_options, dtype=dtype,
                             shard_rows=15, resources=Resources(cpus_per_worker=0.5))
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(job, ["float32", "float16"]))
    won = [r for r in results if isinstance(r, FeatureSet)]
    lost = [r for r in results if not isinstance(r, FeatureSet)]
    assert len(won) == 1 and len(lost) == 1, results
    assert isinstance(lost[0], (LeaseHeld, FileExistsError))
    assert "another featurization is writing to" in str(lost[0]) or "already holds features" in str(lost[0])

    committed = FeatureSet.open(out, storage_options)
    assert committed.fingerprint == won[0].fingerprint and committed.dtype == won[0].dtype
    checked, missing, duplicated = account(committed, len(files))
    assert (checked, missing, duplicated) == (len(files), 0, 0)
    df = committed.to_dataset().to_pandas()
    expected = direct_features(model, [files[p] for p in df["path"]])
    np.testing.assert_allclose(np.stack(df["features"].to_numpy()).astype(np.float32), expected,
                               rtol=1e-2 if committed.dtype == "float16" else 1e-4, atol=1e-3)
    assert not fs.exists(f"{s3_bucket}/features/{LEASE}")
    ledger(tried="two featurizations (float32 and float16) of 90 images started at once on one S3 output",
           inputs=2, checked=f"one committed, the other failed with {type(lost[0]).__name__}; the committed set has "
                             "every row once with the right features", rows_checked=checked, rows_lost=missing)


def test_exclusive_create_has_one_winner(s3_bucket, storage_options, tmp_path, ledger):
    for uri, so in ((f"s3://{s3_bucket}/race.json", storage_options), (str(tmp_path / "race.json"), None)):
        barrier = threading.Barrier(8)

        def create(i):
            barrier.wait()
            try:
                storage.create_bytes(uri, json.dumps({"writer": i}).encode(), so)
                return i
            except FileExistsError:
                return None

        with ThreadPoolExecutor(8) as pool:
            winners = [w for w in pool.map(create, range(8)) if w is not None]
        assert len(winners) == 1 and json.loads(storage.read_bytes(uri, so)) == {"writer": winners[0]}
    ledger(tried="8 writers creating one object at once, on S3 and on a local disk", inputs=16,
           checked="exactly one succeeded each time and its content is the one stored")


def _held_by(uri: str, so, **fields) -> None:
    record = {"owner": "someone-else", "host": socket.gethostname(), "boot_id": "", "pid": 1,
              "acquired": "2026-01-01T00:00:00+00:00", "renewed": time.time(), "timeout": 300.0, **fields}
    storage.write_bytes(storage.join(uri, LEASE), json.dumps(record).encode(), so)


def test_a_lease_is_taken_over_only_from_a_job_that_is_gone(s3_bucket, storage_options, ledger):
    from pipeline.lease import _boot_id

    out = f"s3://{s3_bucket}/leased"
    _held_by(out, storage_options, host="other-node", pid=4242)  # alive elsewhere, renewed just now
    with pytest.raises(LeaseHeld, match=r"held by process 4242 on 'other-node' .* renewed 0s ago"):
        OutputLease(out, storage_options).acquire()

    _held_by(out, storage_options, host="other-node", renewed=time.time() - 400)  # stopped renewing
    lease = OutputLease(out, storage_options).acquire()
    lease.release()
    assert not storage.exists(storage.join(out, LEASE), storage_options)

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _held_by(out, storage_options, boot_id=_boot_id(), pid=int(gone.stdout))  # this machine, process exited
    with OutputLease(out, storage_options) as lease:
        held = json.loads(storage.read_bytes(storage.join(out, LEASE), storage_options))
        assert held["owner"] == lease.owner
        _held_by(out, storage_options, owner="usurper")  # judged dead and taken over by another job
        with pytest.raises(LeaseLost, match="took it over"):
            lease.check()
    assert json.loads(storage.read_bytes(storage.join(out, LEASE), storage_options))["owner"] == "usurper"
    ledger(tried="leases held by a live job elsewhere, a job that stopped renewing, a process that exited, and a "
                 "lease taken from a running job", inputs=4,
           checked="refused while alive (naming holder and age), taken over when gone, the usurped job stops and "
                   "leaves the other's lease alone")
