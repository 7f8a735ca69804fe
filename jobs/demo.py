"""``freezeray demo``: the README's main job on the embedded default (a local Ray, a
local folder as storage, no downloads). It writes scikit-learn's 1,797 handwritten
digits as PNG files in an ImageFolder layout (a seeded, stratified 75/25 split), then
runs ``jobs/configs/digits.yaml`` in that folder."""

from __future__ import annotations

import os
from importlib import resources

import numpy as np

from .config import RunConfig, load_config

__all__ = ["write_digits", "demo_config", "DIGITS_CONFIG"]

DIGITS_CONFIG = "digits.yaml"


def write_digits(root: str, test_size: float = 0.25, seed: int = 0, per_class: int | None = None) -> dict[str, int]:
    """Write the digits as dark-on-light 8x8 PNGs under ``root/{train,test}/<digit>/``.

    Files already there are kept, so a second call writes nothing. Returns the number of
    images per split.
    """
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    index = np.arange(len(digits.target))
    if per_class is not None:
        rng = np.random.default_rng(seed)
        index = np.concatenate([rng.permutation(np.flatnonzero(digits.target == c))[:per_class] for c in range(10)])
    train, test = train_test_split(index, test_size=test_size, stratify=digits.target[index], random_state=seed)
    counts = {}
    for split, ids in (("train", train), ("test", test)):
        for i in ids:
            path = os.path.join(root, split, str(digits.target[i]), f"{i:04d}.png")
            if not os.path.exists(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                pixels = 255 - np.round(digits.images[i] / 16.0 * 255).astype(np.uint8)  # ink on paper
                Image.fromarray(pixels).save(path)
        counts[split] = len(ids)
    return counts


def demo_config(workdir: str, per_class: int | None = None, epochs: int | None = None) -> tuple[RunConfig, dict[str, int], str]:
    """Write the digits under ``workdir`` and return the demo's config for that folder,
    the image counts and where the images are."""
    workdir = os.path.abspath(workdir)
    data = "digits" if per_class is None else f"digits-{per_class}"
    counts = write_digits(os.path.join(workdir, data), per_class=per_class)
    cfg = load_config(str(resources.files("jobs") / "configs" / DIGITS_CONFIG), base_dir=workdir)
    if per_class is not None:
        cfg = cfg.with_(data=cfg.data.model_copy(update={"train": f"{data}/train", "test": f"{data}/test"}),
                        featurize=cfg.featurize.model_copy(update={"output": f"features-{per_class}"}))
    if epochs is not None:
        cfg = cfg.with_(training=cfg.training.model_copy(update={"epochs": epochs}))
    return cfg, counts, os.path.join(workdir, data)
