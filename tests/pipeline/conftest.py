"""Fixtures the pipeline tests share: tiny-model features of generated images."""

import os
import shutil

import pytest
from imagesets import write_folder
from models import tiny_head

from pipeline import featurize
from surgery import FineTuneConfiguration


@pytest.fixture(scope="session")
def tiny(ray_session, tmp_path_factory, tiny_name):
    """Tiny-model features of generated images: train, validation, and the validation
    images with their class folders rotated (labels that training makes ever more wrong)."""
    root = tmp_path_factory.mktemp("tiny")
    write_folder(root / "train", per_class=20, size=20, seed=1, odd_modes=False)
    write_folder(root / "val", per_class=8, size=20, seed=2, odd_modes=False)
    classes = sorted(os.listdir(root / "val"))
    for old, new in zip(classes, classes[1:] + classes[:1]):
        shutil.copytree(root / "val" / old, root / "rotated" / new)
    model = tiny_head(tiny_name, FineTuneConfiguration(updater="adam", lr=0.05, seed=4))
    feats = {split: featurize(model, str(root / split), str(root / f"f-{split}"), dtype="float32")
             for split in ("train", "val", "rotated")}
    return {"root": root, "model": model, **feats}
