"""The jobs layer: configs are checked whole (schema, model, surgery, data, outputs) before
Ray starts, expected failures print one line (the traceback only with --debug) and exit
with their code, `freezeray init` writes a config that runs, every command has useful
help, the demo runs end to end, cluster.yaml fits Ray's schema, and a job submitted with
`ray job submit` to a real Ray head writes its outputs to S3."""

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
from imagesets import bad_files, write_image_folder
from services import die_with_parent, free_port

from jobs.cli import EXIT_CODES, STEPS, classify, main
from jobs.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _images(root, per_class=12, size=24, seed=0):
    def put(p, b):
        (root / p).parent.mkdir(parents=True, exist_ok=True)
        (root / p).write_bytes(b)

    write_image_folder(put, per_class=per_class, size=size, seed=seed, odd_modes=False)
    return root


@pytest.mark.parametrize("path", sorted(glob.glob(str(ROOT / "jobs" / "configs" / "*.yaml"))))
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.name and (cfg.model.base or cfg.model.load)


def test_schema_problems_are_all_reported_with_their_paths(tmp_path):
    bad = {
        "name": "broken",
        "model": {"base": "efficientnet_lite0", "weights": "imagenet", "colour": "blue"},
        "surgery": [{"set_feature_extractor": ["global_pool"]}, {"add_layer": {"name": "head",
                    "layer": {"type": "Output", "n_out": 3, "loss": "hinge"}, "inputs": "global_pool"}},
                    {"chop": "fc2"}],
        "fine_tune": {"updater": "lamb", "lr": -1},
        "data": {"train": "x", "storage_options": {"key": "${FREEZERAY_TEST_UNSET_VAR}"}},
        "featurize": {"output": "f", "dtype": "float8", "resources": {"num_workers": -1}},
        "training": {"epochs": -1, "batch_size": "big", "mode": "both", "sweep": {"space": {}}},
        "extra": 1,
    }
    with pytest.raises(ConfigError) as err:
        parse_config(bad)
    problems = "\n".join(err.value.problems)
    for expected in [
        "model.colour: unknown setting; valid settings: base, weights, kwargs, load",
        "surgery[1].add_layer.layer: unknown loss 'hinge'; valid losses: nll",
        "surgery[2]: unknown op 'chop'; valid ops: set_feature_extractor",
        "fine_tune.updater: must be one of sgd, nesterov, adam",
        "fine_tune.lr: input should be greater than or equal to 0, got -1",
        "data.storage_options.key: environment variable FREEZERAY_TEST_UNSET_VAR is not set",
        "featurize.dtype: input should be 'float16' or 'float32', got 'float8'",
        "featurize.resources.num_workers: input should be greater than or equal to 0, got -1",
        "training.epochs: input should be greater than 0, got -1",
        "training.batch_size: input should be a valid integer",
        "training.mode: input should be 'head' or 'finetune', got 'both'",
        "training.sweep.space: the search space is empty",
        "extra: unknown setting; valid settings: name, model, surgery",
    ]:
        assert expected in problems, expected
    assert len(err.value.problems) == 13


_NO_RAY = """
import sys, ray
def refuse(*a, **k):
    open(sys.argv[2], "w").write("ray.init was called")
    raise SystemExit(99)
ray.init = refuse
from jobs.cli import main
sys.exit(main(["run", sys.argv[1]]))
"""


def test_model_aware_mistakes_are_all_reported_before_ray_starts(tmp_path):
    config = {
        "name": "broken",
        "model": {"base": "vgg17", "weights": "imagenet"},  # a typo: checked against vgg16, the closest
        "surgery": [{"set_feature_extractor": "fc9"},
                    {"n_in_replace": {"vertex": "fc2", "n_in": 100}},  # fc1 gives 4096
                    {"remove_vertex_keep_connections": "predictions"},
                    {"add_layer": {"name": "predictions", "layer": {"type": "Output", "n_out": 3}}}],
        "data": {"train": str(tmp_path / "no-such-folder"), "test": str(_images(tmp_path / "test", per_class=2))},
        "featurize": {"output": "/proc/freezeray/features"},  # even root cannot write there
        "outputs": {"model": str(tmp_path / "model")},
    }
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    marker = tmp_path / "ray-started"
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _NO_RAY, str(path), str(marker)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "tests")})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert not marker.exists() and time.perf_counter() - started < 60
    err = proc.stderr
    assert err.startswith("error: ") and "Traceback" not in err
    for expected in [
        "model.base: unknown zoo model 'vgg17'; closest: vgg16",
        "surgery[0].set_feature_extractor: vertex 'fc9' is not in vgg16; closest: fc2, fc1",
        "surgery[1].n_in_replace: vertex 'fc2' (Dense, expects 100 inputs) cannot take its input from 'fc1' shaped (2, 4096)",
        f"data.train: image source '{tmp_path / 'no-such-folder'}' does not exist",
        "featurize.output: '/proc/freezeray/features' is not writable",
    ]:
        assert expected in err, expected
    assert not (tmp_path / "model").exists()  # nothing was written
    assert main(["check", str(path)]) == 2  # `freezeray check` runs just this


def test_an_output_layer_whose_loss_does_not_fit_the_classes_is_named(tmp_path, capsys, tiny_name):
    images = _images(tmp_path / "images", per_class=3)
    config = {"model": {"base": tiny_name},
              "surgery": [{"set_feature_extractor": "flatten"}, {"remove_vertex_keep_connections": "fc2"},
                          {"add_layer": {"name": "fc2", "layer": {"type": "Output", "n_out": 5, "loss": "bce"}}}],
              "data": {"train": str(images)}, "featurize": {"output": str(tmp_path / "f")}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["check", str(path)]) == 2
    assert ("surgery[2].add_layer.layer: loss 'bce' on output 'fc2' compares 5 values with one-hot labels of 3 "
            "classes") in capsys.readouterr().err
    config["surgery"][2]["add_layer"]["layer"] = {"type": "Output", "n_out": 3, "loss": "cross_entropy"}
    path.write_text(yaml.safe_dump(config))
    assert main(["check", str(path)]) == 0
    assert "ok (model, 3 surgery ops, data.train, outputs)" in capsys.readouterr().out


def _tiny_config(tmp_path, images, tiny_name, weights=None, **sections):
    config = {"name": "tiny", "model": {"base": tiny_name, **({"weights": weights} if weights else {})},
              "surgery": [{"set_feature_extractor": "flatten"}, {"remove_vertex_keep_connections": "fc2"},
                          {"add_layer": {"name": "fc2", "layer": {"type": "Output", "n_out": 3}}}],
              "data": {"train": str(images)}, "featurize": {"output": str(tmp_path / "features")},
              "training": {"epochs": 1, "storage": str(tmp_path / "runs")}, **sections}
    path = tmp_path / f"tiny-{len(list(tmp_path.glob('tiny-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _tiny_weights(path, tiny_name, seed):
    import torch
    from safetensors.torch import save_file

    import surgery

    torch.manual_seed(seed)
    save_file(surgery.zoo.load(tiny_name).state_dict(), str(path))
    return str(path)


def test_expected_failures_print_one_line_and_their_exit_code(ray_session, tmp_path, capsys, tiny_name, monkeypatch):
    images = _images(tmp_path / "images", per_class=4, size=16)

    def run(*argv):
        code = main(list(argv))
        out = capsys.readouterr()
        return code, out.err

    # a bad config: 2, a one-line error, the traceback only with --debug
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {base: resnet18}\ntraining: {epochs: -1}\n")
    for debug in (False, True):
        code, err = run("run", str(bad), *(["--debug"] if debug else []))
        assert code == 2 and f"error: {bad}: 1 problem\n  training.epochs: input should be greater than 0" in err
        assert ("Traceback" in err) == debug and (debug or err.startswith("error: "))

    # storage that stays unavailable: 3
    port = free_port()
    dead = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}}
    monkeypatch.setenv("FREEZERAY_IO_RETRY_SECONDS", "1")
    path = tmp_path / "dead.yaml"
    path.write_text(yaml.safe_dump({"model": {"base": tiny_name}, "data": {"train": "s3://bucket/x", "storage_options": dead},
                                    "training": {"mode": "finetune"}}))
    code, err = run("run", str(path))
    assert code == 3 and "storage unavailable" in err and "Traceback" not in err
    monkeypatch.delenv("FREEZERAY_IO_RETRY_SECONDS")

    # another live job holds the output's lease: 4
    weights_a = _tiny_weights(tmp_path / "a.safetensors", tiny_name, 0)
    config = _tiny_config(tmp_path, images, tiny_name, weights_a)
    lock = tmp_path / "features" / "train" / "_lock.json"
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"owner": "other", "host": os.uname().nodename, "pid": os.getppid(),
                                "boot_id": open("/proc/sys/kernel/random/boot_id").read().strip(),
                                "renewed": time.time(), "timeout": 300, "acquired": "now"}))
    code, err = run("featurize", config)
    assert code == 4 and "another featurization is writing to" in err and "Traceback" not in err
    lock.unlink()

    # features of other weights in the output: 5 (the check cannot see weights; featurize can)
    assert run("featurize", config)[0] == 0
    other = _tiny_config(tmp_path, images, tiny_name, _tiny_weights(tmp_path / "b.safetensors", tiny_name, 1))
    code, err = run("featurize", other, "--debug")
    assert code == 5 and "already holds features with fingerprint" in err and "Traceback" in err
    code, err = run("fit", other)  # the committed features were made by another frozen graph
    assert code == 5 and "were made by a frozen graph with fingerprint" in err and "Traceback" not in err

    # out of memory in an actor: 6, with the hint
    import torch

    import jobs.steps

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(jobs.steps, "fit_step", oom)
    code, err = run("fit", config)
    assert code == 6 and "hint: lower the batch size" in err and "Traceback" not in err
    assert set(EXIT_CODES) >= {0, 1, 2, 3, 4, 5, 6}


def test_a_staged_run_from_yaml_trains_the_head_on_its_features_then_unfreezes(ray_session, tmp_path, capsys, tiny_name):
    images = _images(tmp_path / "images", per_class=6, size=16)
    stages = [{"epochs": 2}, {"unfreeze": ["conv2", "bn2"], "epochs": 1, "lr": 1.0e-4},
              {"frozen": "conv1", "epochs": 1, "lr_slice": [1.0e-5, 1.0e-4]}]
    training = {"mode": "finetune", "stages": stages, "storage": str(tmp_path / "runs"), "run_name": "staged",
                "augment": ["RandomResizedCrop", {"RandomHorizontalFlip": {"p": 0.5}}], "resources": {"num_workers": 0}}
    weights = _tiny_weights(tmp_path / "w.safetensors", tiny_name, 0)  # the same model each time it is built
    config = _tiny_config(tmp_path, images, tiny_name, weights, training=training,
                          outputs={"model": str(tmp_path / "model")})
    assert main(["check", config]) == 0
    assert "3 training stages" in capsys.readouterr().out
    assert main(["run", config]) == 0
    assert "training: 3 stages, 4 epochs (local mode)" in capsys.readouterr().out
    assert (tmp_path / "features" / "train" / "manifest.json").exists()  # the first stage's features
    assert not (tmp_path / "features" / "test").exists()  # only what the stages read was featurized
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [".freezeray-output", "staged-stage0",
                                                                     "staged-stage1", "staged-stage2"]
    import surgery

    saved = surgery.load(str(tmp_path / "model"))
    assert saved.get_submodule("conv2").weight.requires_grad  # the last stage's frozen set is kept
    assert not saved.get_submodule("conv1").weight.requires_grad

    assert main(["run", config]) == 0  # the same stages under the same name: each stage run resumed (finished)
    assert "training: 3 stages, 4 epochs (local mode)" in capsys.readouterr().out
    changed = yaml.safe_load(Path(config).read_text())
    changed["training"]["stages"][1]["lr"] = 5.0e-5
    Path(config).write_text(yaml.safe_dump(changed))
    assert main(["run", config]) == 2  # stage 0 is the same run; stage 1 is not
    err = capsys.readouterr().err.splitlines()[-1]  # after the progress lines (stage 0: reused, resumed)
    assert err.startswith(f"error: training.run_name: run 'staged-stage1' at {tmp_path / 'runs' / 'staged-stage1'} was "
                          "started with another definition (") and "stage.lr 0.0001 -> 5e-05" in err
    assert "--overwrite (training.overwrite: true)" in err

    broken = yaml.safe_load(Path(config).read_text())
    broken["training"]["stages"][1]["unfreeze"] = ["conv9"]
    broken["training"]["augment"] = ["RandomResizeCrop"]
    Path(config).write_text(yaml.safe_dump(broken))
    assert main(["check", config]) == 2
    err = capsys.readouterr().err
    assert "training.augment" in err and "Closest: RandomResizedCrop" in err
    broken["training"]["augment"] = True
    Path(config).write_text(yaml.safe_dump(broken))
    assert main(["check", config]) == 2
    assert "training.stages[1].unfreeze: vertex 'conv9' is not in" in capsys.readouterr().err


def test_a_run_name_reused_with_another_fine_tune_is_refused_naming_the_change(ray_session, tmp_path, capsys, tiny_name):
    images = _images(tmp_path / "images", per_class=4, size=16)
    weights = _tiny_weights(tmp_path / "w.safetensors", tiny_name, 0)
    config = _tiny_config(tmp_path, images, tiny_name, weights, fine_tune={"seed": 0},
                          training={"epochs": 2, "storage": str(tmp_path / "runs"), "run_name": "mine"})
    assert main(["featurize", config]) == 0 and main(["fit", config]) == 0
    first = capsys.readouterr().out
    assert "2 epochs" in first and "resumed" not in first
    assert main(["fit", config]) == 0  # the same name and definition: the same run, resumed (here: finished)
    assert "(run 'mine' resumed: same name and definition)" in capsys.readouterr().out
    run = tmp_path / "runs" / "mine"
    kept = sorted(p.name for p in run.iterdir())

    changed = yaml.safe_load(Path(config).read_text())
    changed["fine_tune"] = {"seed": 0, "updater": "sgd", "lr": 0.1}
    Path(config).write_text(yaml.safe_dump(changed))
    assert main(["fit", config]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: training.run_name: run 'mine' at {run} was started with another definition (fine_tune.lr "
                   "default -> 0.1; fine_tune.updater 'adam' -> 'sgd'); set training.run_name to another name, or rerun "
                   "with --overwrite (training.overwrite: true) to start it again\n")
    assert sorted(p.name for p in run.iterdir()) == kept  # refused: nothing trained, nothing written
    assert main(["fit", config, "--overwrite"]) == 0
    assert "resumed" not in capsys.readouterr().out
    assert main(["fit", config]) == 0 and "resumed" in capsys.readouterr().out  # the new definition is the run's now


def test_failures_from_ray_workers_are_classified_by_their_cause():
    import ray.exceptions

    from freezeray.storage import StorageUnavailable
    from pipeline import LeaseHeld

    assert classify(ray.exceptions.OutOfMemoryError("Task was killed due to the node running low on memory")).code == 6
    wrapped = ray.exceptions.RayTaskError("read_and_decode", "Traceback ...", StorageUnavailable("s3 down"))
    assert classify(wrapped).code == 3
    try:
        try:
            raise LeaseHeld("held")
        except LeaseHeld as exc:
            raise RuntimeError("featurize failed") from exc
    except RuntimeError as exc:
        assert classify(exc).code == 4
    assert classify(KeyError("a bug")) is None


def test_init_writes_a_config_that_runs_with_a_held_out_split(ray_session, tmp_path, capsys):
    import pyarrow.parquet as pq

    from pipeline import FeatureSet

    images = _images(tmp_path / "photos", per_class=10, size=28)
    (images / "red_disc" / "broken.jpg").write_bytes(b"not a jpeg")
    for rel, data in bad_files().items():  # a truncated JPEG, an empty file, text named .jpg
        (images / rel).write_bytes(data)
    assert main(["init", str(images), "--output", str(tmp_path / "run.yaml")]) == 0
    out = capsys.readouterr().out
    assert "34 images in 3 classes: blue_bar 10, green_square 11, red_disc 13" in out
    assert "4 unreadable files of 34 checked" in out and "80/20 split" in out
    text = (tmp_path / "run.yaml").read_text()
    assert text.startswith("# Written by `freezeray init`") and "image_size: 96" in text  # 28 px images
    cfg = load_config(str(tmp_path / "run.yaml"))
    assert cfg.data.test.endswith("freezeray-test.csv") and cfg.surgery[2].layer["n_out"] == 3
    with open(tmp_path / "run.yaml", "a") as f:  # the baselines are tests/jobs/test_demo_task.py's (here 2 min)
        f.write("report: {baselines: false}\n")
    assert main(["run", str(tmp_path / "run.yaml")]) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "report:" in printed
    report = tmp_path / "run-out" / "report"
    page = (report / "report.md").read_text()
    assert "| blue_bar |" in page and "| green_square |" in page and "| red_disc |" in page
    evaluation = json.loads((report / "evaluation.json").read_text())
    assert evaluation["rows"] + evaluation["errors"] == 7  # the held-out fifth: 2, 2 and 3 images a class
    assert evaluation["classes"] == ["blue_bar", "green_square", "red_disc"]

    # every error row is counted, and named, wherever the result is shown
    features = {split: FeatureSet.open(str(tmp_path / "run-out" / "features" / split)) for split in ("train", "test")}
    rows = {split: f.errors_table() for split, f in features.items()}
    assert sum(t.num_rows for t in rows.values()) == 4 and rows["test"].num_rows >= 1
    test_errors = rows["test"].num_rows
    assert evaluation["errors"] == test_errors
    assert sorted(e["path"] for e in evaluation["error_examples"]) == sorted(rows["test"].column("path").to_pylist())
    assert f"on {evaluation['rows']} test images ({test_errors} unreadable)" in printed
    for split, table in rows.items():
        if table.num_rows:
            first = table.column("path").to_pylist()[0].rsplit("/", 1)[-1]
            line = next(ln for ln in printed.splitlines() if ln.startswith(f"unreadable {split} images: "))
            assert line.startswith(f"unreadable {split} images: {table.num_rows} ({first}: ")
            assert line.endswith(f"all in {report}/errors.parquet")
    metrics = json.loads((report / "metrics.json").read_text())
    assert {s: e["count"] for s, e in metrics["errors"].items()} == {s: t.num_rows for s, t in rows.items() if t.num_rows}
    assert metrics["evaluation"]["errors"] == test_errors
    assert metrics["throughput"]["featurize_test"]["errors"] == test_errors
    assert f"({test_errors} unreadable)" in page and "## Unreadable images" in page and "4 images could not" in page
    table = pq.read_table(report / "errors.parquet")
    assert table.num_rows == 4 and sorted(set(table.column("split").to_pylist())) == sorted(s for s in rows if rows[s].num_rows)
    assert not any(p.name.startswith("freezeray-") for p in images.iterdir())  # the split went beside the config

    empty = tmp_path / "empty"
    (empty / "only").mkdir(parents=True)
    assert main(["init", str(empty)]) == 2
    assert "no images under" in capsys.readouterr().err
    one = _images(tmp_path / "one", per_class=3)
    for cls in ("green_square", "red_disc"):
        shutil.rmtree(one / cls)
    assert main(["init", str(one), "--output", str(tmp_path / "one.yaml")]) == 2
    assert "a classifier needs at least two" in capsys.readouterr().err


def test_run_images_writes_beside_the_folder_and_a_rerun_reuses_its_features(ray_session, tmp_path, capsys):
    images = _images(tmp_path / "photos", per_class=6, size=16)
    before = _tree(images)
    assert main(["run", "--images", str(images), "--debug"]) == 0
    first = capsys.readouterr()
    assert "18 images in 3 classes: blue_bar 6, green_square 6, red_disc 6" in first.out
    config, out = tmp_path / "photos.yaml", tmp_path / "photos-out"
    assert config.exists() and f"wrote {config}" in first.out
    assert _tree(images) == before  # nothing written into the image folder
    for folder in (out, out / "features", out / "runs", out / "model", out / "report"):
        assert (folder / ".freezeray-output").read_bytes() == b"", folder  # each output folder is marked as one
    assert main(["run", "--images", str(images)]) == 0  # the second hour: same classes, the features reused
    second = capsys.readouterr()
    assert "18 images in 3 classes: blue_bar 6, green_square 6, red_disc 6" in second.out
    assert "train 15 rows (reused the cached features); test 3 rows (reused the cached features)" in second.out
    assert _tree(images) == before

    # another preprocessing: the committed features are refused, the hint in the CLI's terms
    edited = yaml.safe_load(config.read_text())
    edited["featurize"]["image_size"] = 64
    edited.setdefault("report", {})["baselines"] = False  # the first run computed them; here they would be again
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(edited))
    assert main(["run", str(other)]) == 5
    err = capsys.readouterr().err
    assert err.startswith(f"error: featurize.output: {out / 'features' / 'train'} holds features made another way")
    assert "rerun with --overwrite (or set featurize.overwrite: true in" in err and "=True" not in err
    assert len(err.splitlines()) == 1
    assert main(["run", str(other), "--overwrite"]) == 0
    assert "train 15 rows (computed" in capsys.readouterr().out


def test_init_refuses_to_replace_an_edited_config_without_force(tmp_path, capsys, tiny_name):
    images = _images(tmp_path / "photos", per_class=4, size=16)
    config = tmp_path / "run.yaml"
    assert main(["init", str(images), "--output", str(config), "--model", tiny_name]) == 0
    written = config.read_text()
    assert main(["init", str(images), "--output", str(config), "--model", tiny_name]) == 0  # unedited: replaced
    assert config.read_text() == written
    capsys.readouterr()

    edited = written.replace("fine_tune: {seed: 0}", "fine_tune: {seed: 0, updater: sgd, lr: 0.1}")
    config.write_text(edited)
    assert main(["init", str(images), "--output", str(config), "--model", tiny_name]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {config} was edited since `freezeray init` wrote it; pass --force to replace it, or "
                   "--output to write another config (your edits would be lost)\n")
    assert config.read_text() == edited  # refused: nothing changed
    assert main(["run", "--images", str(images), "--output", str(config), "--model", tiny_name]) == 2
    assert f"run it as it is with `freezeray run {config}`, or pass --force" in capsys.readouterr().err
    assert main(["init", str(images), "--output", str(config), "--model", tiny_name, "--force"]) == 0
    assert config.read_text() == written

    own = tmp_path / "mine.yaml"
    own.write_text("name: mine\n")
    assert main(["init", str(images), "--output", str(own), "--model", tiny_name]) == 2
    assert "was not written by `freezeray init`; pass --force" in capsys.readouterr().err
    assert own.read_text() == "name: mine\n"
    assert main(["init", str(images), "--output", str(images / "inside.yaml"), "--model", tiny_name]) == 2
    assert "would be inside the image folder" in capsys.readouterr().err and not (images / "inside.yaml").exists()


def _tree(root):
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


def test_init_decodes_its_sample_in_full_and_works_on_a_read_only_folder(tmp_path):
    images = _images(tmp_path / "photos", per_class=5, size=16)
    for rel, data in bad_files().items():  # a truncated JPEG, an empty file, text named .jpg
        (images / rel).write_bytes(data)
    before = _tree(images)
    for path in [images, *images.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    # root writes anywhere: drop its override of file permissions (CAP_DAC_OVERRIDE) for the command
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot make a folder read-only for this process")
        prefix = ["setpriv", "--bounding-set=-dac_override"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    script = "import sys; from jobs.cli import main; sys.exit(main(sys.argv[1:]))"
    try:
        probe = subprocess.run([*prefix, sys.executable, "-c", f"open({str(images / 'probe')!r}, 'w')"],
                               capture_output=True, text=True)
        assert probe.returncode != 0  # the folder is read-only for the command
        out = tmp_path / "elsewhere"
        proc = subprocess.run([*prefix, sys.executable, "-c", script, "init", str(images), "--output",
                               str(out / "run.yaml")], capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr
        assert "3 unreadable files of 18 checked" in proc.stdout  # the truncated JPEG too: decoded in full
        assert "truncated.jpg: cannot decode image" in proc.stdout and "empty.jpg: empty file" in proc.stdout
        assert f"written as freezeray-train.csv and freezeray-test.csv in {out / 'run-out' / 'splits'}" in proc.stdout
        assert _tree(images) == before  # nothing written into the image folder
        # splits asked for inside the read-only folder: one line, exit 3 (data or storage), not 1 (a bug)
        proc = subprocess.run([*prefix, sys.executable, "-c", script, "init", str(images), "--output",
                               str(out / "two.yaml"), "--splits", str(images)], capture_output=True, text=True, env=env)
        assert proc.returncode == 3, proc.stderr
        assert proc.stderr.startswith(f"error: cannot write the split manifests to {images}") and \
            "give --splits DIR" in proc.stderr and len(proc.stderr.splitlines()) == 1
    finally:
        for path in [images, *images.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
    cfg = load_config(str(out / "run.yaml"))
    assert cfg.data.allow_outside and cfg.data.test == str(out / "run-out" / "splits" / "freezeray-test.csv")
    assert (out / "run-out" / ".freezeray-output").read_bytes() == b""
    assert main(["check", str(out / "run.yaml")]) == 0  # the manifests outside the image folder are read
    listed = (out / "run-out" / "splits" / "freezeray-test.csv").read_text().splitlines()
    assert listed[0] == "path,label" and all(line.startswith(str(images) + "/") for line in listed[1:])


def test_hints_are_in_the_clis_terms_and_data_options_reach_the_reader(tmp_path, capsys, tiny_name):
    images = _images(tmp_path / "photos", per_class=2, size=16)
    lists = tmp_path / "lists"
    lists.mkdir()
    rows = [f"../photos/{p.parent.name}/{p.name},{p.parent.name}" for p in sorted(images.rglob("*.jpg"))]
    (lists / "train.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    config = _tiny_config(tmp_path, lists / "train.csv", tiny_name)
    assert main(["check", config]) == 2
    err = capsys.readouterr().err
    assert "data.train: manifest" in err and "set data.allow_outside: true if you trust it" in err and "=True" not in err
    allowed = yaml.safe_load(Path(config).read_text())
    allowed["data"]["allow_outside"] = True
    Path(config).write_text(yaml.safe_dump(allowed))
    assert main(["check", config]) == 0


def test_debug_verbose_and_version_work_before_the_command(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {base: resnet18}\ntraining: {epochs: -1}\n")
    for argv in (["--debug", "check", str(bad)], ["check", str(bad), "--debug"], ["--verbose", "--debug", "check", str(bad)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" in err and "training.epochs: input should be greater than 0" in err, argv
    assert main(["check", str(bad)]) == 2 and "Traceback" not in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    from importlib.metadata import version

    assert capsys.readouterr().out == f"freezeray {version('freezeray')}\n"


@pytest.mark.parametrize("command", [*STEPS, "check", "init", "summary", "demo"])
def test_every_command_has_useful_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert f"freezeray {command}" in text and len(text) > 200
    assert ("config" in text.lower()) or command in ("summary", "demo", "init")


def test_python_m_entry_points_are_the_cli(tmp_path):
    for step in STEPS:
        proc = subprocess.run([sys.executable, "-m", f"jobs.{step}", "--help"], capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 0 and f"freezeray {step}" in proc.stdout
    proc = subprocess.run([str(BIN / "freezeray"), "summary", "resnet18"], capture_output=True, text=True)
    assert proc.returncode == 0 and "layer4.1.conv2" in proc.stdout and "Total params:     11,689,512" in proc.stdout


def test_demo_runs_end_to_end_quietly_and_reuses_its_features(ray_session, tmp_path, capsys):
    # the digits (the surfaces, the default task, are tests/jobs/test_demo_task.py's)
    assert main(["demo", "--task", "digits", "--workdir", str(tmp_path), "--per-class", "12"]) == 0
    out = capsys.readouterr()
    printed = out.out
    assert "accuracy" in printed and "report:" in printed and "model:" in printed and "local mode" in printed
    assert len((out.out + out.err).splitlines()) <= 30, out.out + out.err
    assert "featurize train: 90 images in" in out.err  # not a terminal: one plain line per stage
    report = tmp_path / "report"
    for name in ("curves.png", "confusion.png", "metrics.json", "evaluation.json", "report.md", "config.yaml", "summary.txt"):
        assert (report / name).stat().st_size > 0, name
    assert (report / "curves.png").read_bytes()[:4] == b"\x89PNG"
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["history"][-1]["stopped_early"] and metrics["run"]["mode"] == "local"
    assert metrics["evaluation"]["accuracy"] >= 0.5  # 12 digits a class; the full demo reaches 0.95
    assert (tmp_path / "model" / "recipe.json").exists() and (tmp_path / "model" / "model.safetensors").exists()
    # a second run reuses the cached features and says so
    assert main(["demo", "--task", "digits", "--workdir", str(tmp_path), "--per-class", "12", "--epochs", "1"]) == 0
    assert "reused the cached features" in capsys.readouterr().out


def test_report_figures_leave_matplotlibs_backend_alone():
    import matplotlib

    from jobs.report import confusion_png, curves_png

    before = matplotlib.get_backend()
    assert curves_png([{"epoch": 0, "loss": 1.0, "accuracy": 0.5}])[:4] == b"\x89PNG"
    assert confusion_png([[1, 0], [0, 1]], ["a", "b"])[:4] == b"\x89PNG"
    assert matplotlib.get_backend() == before


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
            head.wait(timeout=5)  # measured: it does not exit by itself within 20 s; its group is killed next
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
        # one Ray Train worker: the job's training crosses processes, its checkpoints go to S3
        "training": {"resources": {"num_workers": 1}, "epochs": 2, "batch_size": 8, "storage": f"s3://{s3_bucket}/runs"},
        "outputs": {"model": f"s3://{s3_bucket}/model", "report": f"s3://{s3_bucket}/report"},
        "report": {"baselines": False},  # the baselines are tests/jobs/test_demo_task.py's
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    runtime_env = {"working_dir": str(ROOT), "excludes": [".venv", ".git", "freezeray-out"],
                   "env_vars": {"S3_KEY": s3_server.access_key, "S3_SECRET": s3_server.secret_key,
                                "S3_ENDPOINT": s3_server.endpoint_url, "RAY_USAGE_STATS_ENABLED": "0"}}
    for _ in range(10):  # the head's job agent registers a little after its job server answers
        proc = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", address, "--runtime-env-json", json.dumps(runtime_env),
             "--", "python", "-m", "jobs.run", "--config", str(path), "--debug"],  # a failure shows its traceback
            capture_output=True, text=True, env=env, timeout=900,
        )
        if "No available agent to submit job" not in proc.stdout + proc.stderr:
            break
        time.sleep(2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout and "accuracy" in proc.stdout and "(1 Ray Train worker)" in proc.stdout
    assert fs.exists(f"{s3_bucket}/model/recipe.json") and fs.exists(f"{s3_bucket}/features/train/manifest.json")
    assert fs.exists(f"{s3_bucket}/report/curves.png") and fs.exists(f"{s3_bucket}/report/confusion.png")
    written = fs.cat(f"{s3_bucket}/report/config.yaml").decode()
    assert s3_server.secret_key not in written and "${S3_SECRET}" in written
