"""Hostile files: pickles with code in them, manifests that point outside their folder,
recipes and configs that try to run code. Nothing is executed and nothing outside is read."""

from __future__ import annotations

import json
import os
import pickle

import pandas as pd
import pytest
import torch
import yaml
from imagesets import write_image_folder

import surgery
from jobs.config import ConfigError, load_config
from pipeline import read_images
from surgery import WeightsError
from surgery.weights import read_state_dict


class _Payload:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickles_with_code_are_refused_without_running_it(tmp_path, tiny_name, ledger):
    marker = tmp_path / "pwned"
    model = surgery.zoo.load(tiny_name)
    tries = 0

    evil = tmp_path / "evil.pt"  # a state dict with one poisoned entry
    torch.save({**model.state_dict(), "extra": _Payload(marker)}, evil)
    plain = tmp_path / "plain.pkl"  # a bare pickle, no torch wrapper
    plain.write_bytes(pickle.dumps(_Payload(marker)))
    module = tmp_path / "module.pt"  # a whole nn.Module, as torch.save(model) writes it
    torch.save(torch.nn.Linear(2, 2), module)
    for path in (evil, plain, module):
        with pytest.raises(WeightsError, match="not a weights-only file|neither a safetensors file"):
            read_state_dict(str(path))
        with pytest.raises(WeightsError):
            surgery.zoo.load(tiny_name, weights=str(path))
        tries += 2

    saved = tmp_path / "model"  # a saved model folder whose weights were swapped for a pickle
    surgery.save(model, str(saved))
    (saved / "model.safetensors").write_bytes(evil.read_bytes())
    with pytest.raises(Exception, match="safetensors|header|deserializ"):
        surgery.load(str(saved))
    tries += 1
    assert not marker.exists()
    ledger(tried=f"{tries} loads of pickles with code (a poisoned state dict, a bare pickle, a whole module) as "
                 "weights, zoo weights and a saved model's weights", inputs=tries,
           checked="each refused with WeightsError or a safetensors error; the payload never ran")


def test_recipes_cannot_name_code(tmp_path, tiny_name, ledger):
    saved = tmp_path / "model"
    surgery.save(surgery.zoo.load(tiny_name), str(saved))
    recipe = json.loads((saved / "recipe.json").read_text())
    cases = [
        ({**recipe, "base": {**recipe["base"], "name": "os.system"}}, "unknown zoo model 'os.system'"),
        ({**recipe, "stages": [[{"op": "__import__", "vertex": "os"}]]}, r"\[0\]: unknown op '__import__'; valid ops: set_feature_extractor"),
        ({**recipe, "format": "pickle"}, "unknown recipe format"),
    ]
    for bad, message in cases:
        (saved / "recipe.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=message):
            surgery.load(str(saved))
    ledger(tried="recipes naming os.system as the base model, __import__ as an op, and a pickle format",
           inputs=len(cases), checked="each refused with an error naming the value")


def test_manifests_that_point_outside_their_folder_are_refused(tmp_path, s3_server, s3_bucket, storage_options,
                                                               ledger):
    root = tmp_path / "data"

    def put(path, data):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)

    write_image_folder(put, per_class=1, size=16, odd_modes=False)
    secret = tmp_path / "secret.jpg"
    secret.write_bytes((root / "red_disc/0000.jpg").read_bytes())
    inside = ["red_disc/0000.jpg", "./blue_bar/../blue_bar/0000.jpg", f"file://{root}/green_square/0000.jpg"]
    outside = ["../secret.jpg", str(secret), "red_disc/../../secret.jpg", f"file://{secret}",
               f"s3://{s3_bucket}/x.jpg", "/etc/passwd"]
    pd.DataFrame({"path": inside}).to_csv(root / "ok.csv", index=False)
    assert len(read_images(str(root / "ok.csv"))) == 3
    for p in outside:
        pd.DataFrame({"path": inside + [p]}).to_csv(root / "m.csv", index=False)
        with pytest.raises(ValueError, match=r"lists 1 paths outside its own folder .*row 3: "):
            read_images(str(root / "m.csv"))
    pd.DataFrame({"path": outside}).to_csv(root / "all.csv", index=False)
    assert len(read_images(str(root / "all.csv"), allow_outside=True)) == len(outside)  # the explicit opt-in

    fs = s3_server.filesystem()
    other = s3_server.make_bucket(f"{s3_bucket}-other")
    fs.pipe(f"{other}/private.jpg", secret.read_bytes())
    for p in (f"s3://{other}/private.jpg", "../../private.jpg", f"/{other}/private.jpg", str(secret)):
        fs.pipe(f"{s3_bucket}/set/m.csv", pd.DataFrame({"path": ["a.jpg", p]}).to_csv(index=False).encode())
        with pytest.raises(ValueError, match="outside its own folder"):
            read_images(f"s3://{s3_bucket}/set/m.csv", storage_options)
    ledger(tried=f"{len(outside) + 4} manifest paths outside the manifest's folder: ../, absolute paths, file:// "
                 "and s3:// URIs, another bucket", inputs=len(outside) + 4,
           checked="each refused with the row named; paths inside (also with ./ and ..) accepted; allow_outside opts in")


def test_config_values_are_never_evaluated_as_code(tmp_path, monkeypatch, ledger):
    marker = tmp_path / "pwned"
    monkeypatch.chdir(tmp_path)
    attacks = [
        f"!!python/object/apply:os.system ['touch {marker}']",
        f"!!python/object/new:subprocess.Popen [['touch', '{marker}']]",
        "!!python/name:os.system",
    ]
    for tag in attacks:
        (tmp_path / "c.yaml").write_text(f"name: x\nmodel: {{base: {tag}}}\n")
        with pytest.raises(ConfigError, match="not valid YAML"):
            load_config(str(tmp_path / "c.yaml"))
    monkeypatch.setenv("FREEZERAY_TEST_KEY", "k")
    code = f"__import__('os').system('touch {marker}')"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({
        "name": code,
        "model": {"base": code},
        "data": {"train": "$(touch " + str(marker) + ")", "storage_options": {"key": "${HOME:-`touch " + str(marker) + "`}"}},
        "training": {"epochs": "1 + 1"},
    }))
    with pytest.raises(ConfigError) as raised:
        load_config(str(tmp_path / "c.yaml"))
    assert "training.epochs: input should be a valid integer, unable to parse string as an integer, got '1 + 1'" in str(raised.value)
    assert not marker.exists()
    ledger(tried=f"{len(attacks)} YAML python tags and code in a name, a model, a path, an env reference and a "
                 "number", inputs=len(attacks) + 5,
           checked="tags refused as invalid YAML, the rest read as plain strings; nothing ran")
