"""Secrets: the S3 keys a run is given (in the config's environment references, or as
``storage_options``) appear nowhere in what it writes or says: logs, printed output, Ray's
session logs, feature manifests, recipes, checkpoints, reports and error messages."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml
from imagesets import write_image_folder

from freezeray import storage
from jobs.cli import main
from pipeline import featurize, read_images


def _ray_logs() -> list[Path]:
    import ray

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    return [p for p in (session / "logs").rglob("*") if p.is_file()]


def _find(secrets: dict[str, str], blobs: dict[str, bytes]) -> list[str]:
    return [f"{what} in {where}" for where, data in blobs.items() for what, value in secrets.items()
            if value.encode() in data]


def test_keys_never_appear_in_anything_a_run_writes_or_says(ray_session, s3_server, s3_bucket, tmp_path, monkeypatch,
                                                            capsys, caplog, tiny_name, ledger):
    secrets = {"access key": s3_server.access_key, "secret key": s3_server.secret_key}
    fs = s3_server.filesystem()
    write_image_folder(lambda p, b: fs.pipe(f"{s3_bucket}/train/{p}", b), per_class=10, size=20, odd_modes=False)
    fs.pipe(f"{s3_bucket}/train/red_disc/broken.jpg", b"\xff\xd8 not really")
    monkeypatch.setenv("FRZ_TEST_KEY", s3_server.access_key)
    monkeypatch.setenv("FRZ_TEST_SECRET", s3_server.secret_key)
    config = {
        "name": "secrets",
        "model": {"base": tiny_name},
        "surgery": [{"set_feature_extractor": "flatten"}, {"remove_vertex_keep_connections": "fc2"},
                    {"add_layer": {"name": "fc2", "layer": {"type": "Output", "n_out": 3, "loss": "cross_entropy"}}}],
        "fine_tune": {"updater": "adam", "lr": 0.01, "seed": 0},
        "data": {"train": f"s3://{s3_bucket}/train", "validation": 0.2, "test": f"s3://{s3_bucket}/train",
                 "storage_options": {"key": "${FRZ_TEST_KEY}", "secret": "${FRZ_TEST_SECRET}",
                                     "client_kwargs": {"endpoint_url": s3_server.endpoint_url,
                                                       "region_name": "us-east-1"}}},
        "featurize": {"output": f"s3://{s3_bucket}/features", "resources": {"cpus_per_worker": 0.5}},
        "training": {"mode": "head", "epochs": 2, "batch_size": 16, "run_name": "r",  # local mode, checkpoints on S3
                     "storage": f"s3://{s3_bucket}/runs"},
        "outputs": {"model": f"s3://{s3_bucket}/model", "report": str(tmp_path / "report")},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    logs_before = {p: p.stat().st_size for p in _ray_logs()}
    with caplog.at_level(logging.INFO):
        assert main(["run", str(tmp_path / "run.yaml"), "--verbose"]) == 0

    # failures with the same credentials: their messages must not carry them either
    wrong = {**s3_server.storage_options, "secret": "wrong-" + s3_server.secret_key[::-1]}
    secrets["wrong secret"] = wrong["secret"]
    errors = []
    for attempt in (lambda: read_images(f"s3://{s3_bucket}-missing/x", s3_server.storage_options),
                    lambda: read_images(f"s3://{s3_bucket}/train", wrong),
                    lambda: featurize(None, f"s3://{s3_bucket}/train", f"s3://{s3_bucket}/f2",
                                      storage_options=s3_server.storage_options),
                    lambda: storage.read_bytes(f"s3://{s3_bucket}/nothing-here", wrong)):
        with pytest.raises(Exception) as raised:
            attempt()
        errors.append(raised.value)

    out = capsys.readouterr()
    blobs = {"stdout": out.out.encode(), "stderr": out.err.encode(),
             "log records": "\n".join(r.getMessage() for r in caplog.records).encode()}
    for i, exc in enumerate(errors):
        blobs[f"error {i} ({type(exc).__name__})"] = f"{exc!r} {exc} {exc.__cause__!r}".encode()
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "run.yaml"]
    blobs.update({str(p): p.read_bytes() for p in written})
    objects = fs.find(s3_bucket)
    blobs.update({f"s3://{key}": fs.cat(key) for key in objects})
    ray_logs = _ray_logs()
    blobs.update({str(p): p.read_bytes()[logs_before.get(p, 0):] for p in ray_logs})  # what this run added
    assert not _find(secrets, blobs)
    assert len(_find({"the bucket name": s3_bucket}, blobs)) > 10  # the search does see what was written

    kinds = {"manifest.json", "recipe.json", "meta.json", "config.yaml", "report.md", "metrics.json"}
    assert kinds <= {Path(k).name for k in blobs}, kinds - {Path(k).name for k in blobs}
    ledger(tried="a featurize + fit + evaluate + report job on S3 with keys from ${ENV} references, and four "
                 "failing calls with real and wrong keys", inputs=len(errors),
           checked=f"{len(blobs)} outputs (stdout, stderr, log records, error messages, {len(written)} local files, "
                   f"{len(objects)} S3 objects, {len(ray_logs)} Ray session logs) hold neither key")
