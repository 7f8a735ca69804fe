"""The jobs layer: configs validate (all problems at once, before Ray starts), every
command has useful help, the demo runs end to end, cluster.yaml fits Ray's schema, and a
job submitted with `ray job submit` to a real Ray head writes its outputs to S3."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from imagesets import write_image_folder
from jobs.cli import STEPS, main
from jobs.config import ConfigError, load_config, parse_config
from services import die_with_parent, free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.mark.parametrize("path", sorted(glob.glob(str(ROOT / "jobs" / "configs" / "*.yaml"))))
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.name and (cfg.model.base or cfg.model.load)


def test_a_config_with_several_mistakes_reports_them_all_and_starts_nothing(tmp_path):
    bad = {
        "name": "broken",
        "model": {"base": "efficientnet_lite0", "weights": "imagenet", "colour": "blue"},
        "surgery": [{"set_feature_extractor": ["global_pool"]}, {"add_layer": {"name": "head",
                    "layer": {"type": "Output", "n_out": 3, "loss": "hinge"}, "inputs": "global_pool"}},
                    {"chop": "fc2"}],
        "fine_tune": {"updater": "lamb", "lr": -1},
        "data": {"train": "x", "storage_options": {"key": "${FREEZERAY_TEST_UNSET_VAR}"}},
        "featurize": {"output": "f", "dtype": "float8", "num_actors": 0},
        "training": {"epochs": -1, "batch_size": "big", "mode": "both"},
    }
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    problems = "\n".join(err.value.problems)
    for expected in [
        "model.colour: unknown setting",
        "surgery[1].add_layer.layer: unknown loss 'hinge'",
        "surgery[2]: unknown op 'chop'",
        "fine_tune: updater must be one of",
        "lr must be a number",
        "data.storage_options.key: environment variable FREEZERAY_TEST_UNSET_VAR is not set",
        "featurize.dtype: must be one of float16, float32, got 'float8'",
        "featurize.num_actors: must be a positive integer, got 0",
        "training.epochs: must be a positive integer, got -1",
        "training.batch_size: must be a positive integer, got 'big'",
        "training.mode: must be one of head, finetune, got 'both'",
    ]:
        assert expected in problems, expected
    started = time.perf_counter()
    proc = subprocess.run([str(BIN / "freezeray"), "run", str(path)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "training.epochs: must be a positive integer, got -1" in proc.stderr
    assert "Ray" not in proc.stdout + proc.stderr and time.perf_counter() - started < 60
    assert not list(tmp_path.glob("f*"))  # nothing was written


def test_credentials_come_from_the_environment_and_are_never_written_out(monkeypatch):
    monkeypatch.setenv("FREEZERAY_TEST_SECRET", "s3cr3t")
    raw = {"model": {"base": "resnet18"}, "data": {"storage_options": {"secret": "${FREEZERAY_TEST_SECRET}", "key": "literal-key"}}}
    cfg = parse_config(raw)
    assert cfg.data.storage_options == {"secret": "s3cr3t", "key": "literal-key"}
    from jobs.report import _redacted_config
    from jobs.steps import RunOutcome

    written = yaml.safe_dump(_redacted_config(RunOutcome(cfg)))
    assert "s3cr3t" not in written and "literal-key" not in written and "${FREEZERAY_TEST_SECRET}" in written


@pytest.mark.parametrize("command", [*STEPS, "summary", "demo"])
def test_every_command_has_useful_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert f"freezeray {command}" in text and len(text) > 200
    assert ("config" in text.lower()) or command in ("summary", "demo")


def test_python_m_entry_points_are_the_cli(tmp_path):
    for step in STEPS:
        proc = subprocess.run([sys.executable, "-m", f"jobs.{step}", "--help"], capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 0 and f"freezeray {step}" in proc.stdout
    proc = subprocess.run([str(BIN / "freezeray"), "summary", "resnet18"], capture_output=True, text=True)
    assert proc.returncode == 0 and "layer4.1.conv2" in proc.stdout and "Total params:     11,689,512" in proc.stdout


def test_demo_runs_end_to_end(ray_session, tmp_path, capsys):
    assert main(["demo", "--workdir", str(tmp_path), "--per-class", "12", "--epochs", "3"]) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "report:" in printed and "model:" in printed
    report = tmp_path / "report"
    for name in ("curves.png", "confusion.png", "metrics.json", "evaluation.json", "report.md", "config.yaml", "summary.txt"):
        assert (report / name).stat().st_size > 0, name
    assert (report / "curves.png").read_bytes()[:4] == b"\x89PNG"
    metrics = json.loads((report / "metrics.json").read_text())
    assert len(metrics["history"]) == 3 and 0.0 <= metrics["evaluation"]["accuracy"] <= 1.0
    assert (tmp_path / "model" / "recipe.json").exists() and (tmp_path / "model" / "model.safetensors").exists()
    # a second run reuses the cached features and says so
    assert main(["demo", "--workdir", str(tmp_path), "--per-class", "12", "--epochs", "1"]) == 0
    assert "reused the cached features" in capsys.readouterr().out


def test_cluster_yaml_fits_rays_schema():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(fillout_defaults(config))
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}
    import ray

    assert f"ray:{ray.__version__}" in config["docker"]["image"]


@pytest.fixture
def ray_head(tmp_path):
    """A separate Ray head (`ray start --head --block`) on loopback, with the job server.

    It is stopped by signalling its own `ray start` process, never with `ray stop`, which
    would also stop the test session's Ray.
    """
    import secrets

    port, dash = free_port(), free_port()
    # every port of its own: the test session's Ray already holds the default agent port (52365)
    agent_ports = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                   f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
                   f"--ray-client-server-port={free_port()}"]
    # token authentication on, with a token of this test's own (Ray 2.60 enables it by default)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    temp = Path("/tmp") / f"rayhead-{port}"
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
         "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--temp-dir={temp}", "--object-store-memory=500000000", "--disable-usage-stats", *agent_ports],
        env=env, stdout=open(tmp_path / "ray-head.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True,
        preexec_fn=die_with_parent,
    )
    try:
        deadline = time.monotonic() + 180
        while True:  # the job server answers once the head is up
            probe = subprocess.run([str(BIN / "ray"), "job", "list", "--address", f"http://127.0.0.1:{dash}"],
                                   env=env, capture_output=True, timeout=60)
            if probe.returncode == 0:
                break
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Ray head did not start; see {tmp_path / 'ray-head.log'}")
            time.sleep(2)
        yield f"http://127.0.0.1:{dash}", env
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            head.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_ray_job_submit_runs_a_config_and_writes_to_s3(ray_head, s3_server, s3_bucket, tmp_path):
    address, env = ray_head
    fs = s3_server.filesystem()
    write_image_folder(lambda p, b: fs.pipe(f"{s3_bucket}/images/{p}", b), per_class=6, size=24, odd_modes=False)
    config = {
        "name": "submitted",
        "model": {"base": "efficientnet_lite0", "weights": "imagenet"},
        "surgery": [{"set_feature_extractor": "global_pool"}, {"remove_vertex_keep_connections": "classifier"},
                    {"add_layer": {"name": "classifier", "layer": {"type": "Output", "n_out": 3}}}],
        "fine_tune": {"updater": "adam", "lr": 0.003, "seed": 0},
        "data": {"train": f"s3://{s3_bucket}/images", "test": f"s3://{s3_bucket}/images",
                 "storage_options": {"key": "${S3_KEY}", "secret": "${S3_SECRET}",
                                     "client_kwargs": {"endpoint_url": "${S3_ENDPOINT}"}}},
        "featurize": {"output": f"s3://{s3_bucket}/features", "image_size": 32},
        "training": {"num_workers": 1, "epochs": 2, "batch_size": 8, "storage": f"s3://{s3_bucket}/runs"},
        "outputs": {"model": f"s3://{s3_bucket}/model", "report": f"s3://{s3_bucket}/report"},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    runtime_env = {"working_dir": str(ROOT), "excludes": [".venv", ".git", "freezeray-out"],
                   "env_vars": {"S3_KEY": s3_server.access_key, "S3_SECRET": s3_server.secret_key,
                                "S3_ENDPOINT": s3_server.endpoint_url, "RAY_USAGE_STATS_ENABLED": "0"}}
    for _ in range(10):  # the head's job agent registers a little after its job server answers
        proc = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", address, "--runtime-env-json", json.dumps(runtime_env),
             "--", "python", "-m", "jobs.run", "--config", str(path)],
            capture_output=True, text=True, env=env, timeout=900,
        )
        if "No available agent to submit job" not in proc.stdout + proc.stderr:
            break
        time.sleep(2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout and "accuracy" in proc.stdout
    assert fs.exists(f"{s3_bucket}/model/recipe.json") and fs.exists(f"{s3_bucket}/features/train/manifest.json")
    assert fs.exists(f"{s3_bucket}/report/curves.png") and fs.exists(f"{s3_bucket}/report/confusion.png")
    written = fs.cat(f"{s3_bucket}/report/config.yaml").decode()
    assert s3_server.secret_key not in written and "${S3_SECRET}" in written
