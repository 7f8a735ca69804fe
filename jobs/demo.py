"""``freezeray demo``: the README's main job on the embedded default (a local Ray, a
local folder as storage, no downloads), on one of two bundled image sets written as
an ImageFolder (``train/<class>/``, ``test/<class>/``):

* ``surfaces`` (the default): which surface is this patch? Ten classes, one per
  picture that ships inside scikit-image (``skimage/data``): a brick wall, grass,
  gravel, coins, a printed page, handwriting, the moon's surface, the Hubble deep field,
  stained tissue (immunohistochemistry) and a retina. Training patches are cut from the
  left 60% of each picture and test patches from the right 40%, so a test patch is never
  a crop of a training one: the model has to recognise the kind of surface in a part of
  the picture it has not seen. Each patch has its own scale (10-50% of the picture's
  shorter side), a random flip and quarter turn (a surface has no up or down) and
  brightness, contrast and colour jitter; nearly uniform patches (a stretch of black
  sky or background) are drawn again. 60 training and 30 test patches a class, 128 px
  JPEGs, from a fixed seed: the same files every time. It is a transfer task: 60 images
  a class are far too few to learn texture filters from scratch (the same network with
  random weights, and a linear model on the pixels, both stay near 50-60%; see the
  README), while ImageNet features separate the surfaces almost perfectly.
* ``digits``: scikit-learn's 1,797 handwritten digits as 8x8 PNGs (a seeded, stratified
  75/25 split), ``jobs/configs/digits.yaml``. Kept as a configuration: upsampled 8x8
  digits are not a task where ImageNet features are the right tool (a pixel SVC scores
  0.99 on them).

Then it runs the task's config (``jobs/configs/<task>.yaml``) in that folder."""

from __future__ import annotations

import os
from importlib import resources
from typing import Literal

import numpy as np

from .config import RunConfig, load_config
from .errors import CliError

__all__ = ["write_digits", "write_surfaces", "demo_config", "SURFACES", "TASKS", "Task"]

Task = Literal["surfaces", "digits"]
TASKS: dict[str, str] = {"surfaces": "surfaces.yaml", "digits": "digits.yaml"}  # demo task -> its config in jobs/configs

# class -> the picture in skimage/data it is cut from
SURFACES: dict[str, str] = {
    "brick": "brick.png", "grass": "grass.png", "gravel": "gravel.png", "coins": "coins.png",
    "print": "page.png", "handwriting": "text.png", "moon": "moon.png", "stars": "hubble_deep_field.jpg",
    "tissue": "ihc.png", "retina": "retina.jpg",
}
_TRAIN_PART = 0.6  # training patches from the left 60% of each picture, test patches from the rest
_SCALE = (0.1, 0.5)  # a patch's side, as a fraction of the picture's shorter side
_JITTER = 0.4  # brightness, contrast and colour factors drawn from [1 - j, 1 + j]
_MIN_STD = 6.0  # patches whose grey levels vary less than this (of 255) are drawn again
_PATCH = 128  # pixels a side of the written JPEGs


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


def _picture(file: str) -> "np.ndarray":
    """One of scikit-image's bundled pictures as (H, W, 3) uint8, read from the installed
    package's files (no download, and no scikit-image import beyond locating them)."""
    from PIL import Image

    try:
        folder = resources.files("skimage") / "data"
    except ModuleNotFoundError:
        raise CliError(3, "the surfaces demo cuts its images from pictures that ship in scikit-image, which is not "
                          "installed: pip install scikit-image (make demo installs it), or run "
                          "`freezeray demo --task digits`") from None
    with (folder / file).open("rb") as f:
        return np.asarray(Image.open(f).convert("RGB"))


def _patches(picture: "np.ndarray", split: int, n: int, seed: int, cls: int) -> list["np.ndarray"]:
    """``n`` patches of ``picture`` (train: ``split`` 0, from its left part; test: 1, the
    rest), each with its own scale, flip, quarter turn and jitter. The first ``k`` are the
    same for every ``n >= k``."""
    from PIL import Image, ImageEnhance

    rng = np.random.default_rng([seed, cls, split])
    img = Image.fromarray(picture)
    width, height = img.size
    cut = int(_TRAIN_PART * width)
    x0, x1 = (0, cut) if split == 0 else (cut, width)
    out: list[np.ndarray] = []
    while len(out) < n:
        side = int(min(rng.uniform(*_SCALE) * min(width, height), x1 - x0, height))
        x, y = int(rng.integers(x0, x1 - side + 1)), int(rng.integers(0, height - side + 1))
        patch = img.crop((x, y, x + side, y + side)).resize((_PATCH, _PATCH), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            patch = patch.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        patch = patch.rotate(90 * int(rng.integers(4)))
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            patch = enhance(patch).enhance(float(rng.uniform(1 - _JITTER, 1 + _JITTER)))
        pixels = np.asarray(patch)
        if pixels.mean(axis=2).std() >= _MIN_STD:  # not a blank stretch of sky or background
            out.append(pixels)
    return out


def write_surfaces(root: str, train: int = 60, test: int = 30, seed: int = 0) -> dict[str, int]:
    """Write the surfaces task (see the module docstring) as JPEGs under
    ``root/{train,test}/<surface>/``: ``train`` and ``test`` patches per class.

    Files already there are kept, so a second call writes nothing. Returns the number of
    images per split.

    Raises:
        CliError: scikit-image, whose files hold the pictures, is not installed.
    """
    from PIL import Image

    counts = {"train": 0, "test": 0}
    for cls, (name, file) in enumerate(SURFACES.items()):
        for split, (part, n) in enumerate((("train", train), ("test", test))):
            folder = os.path.join(root, part, name)
            paths = [os.path.join(folder, f"{name}-{i:03d}.jpg") for i in range(n)]
            if not all(os.path.exists(p) for p in paths):
                os.makedirs(folder, exist_ok=True)
                for path, pixels in zip(paths, _patches(_picture(file), split, n, seed, cls)):
                    Image.fromarray(pixels).save(path, quality=90)
            counts[part] += n
    return counts


def demo_config(workdir: str, task: Task = "surfaces", per_class: int | None = None,
                epochs: int | None = None) -> tuple[RunConfig, dict[str, int], str]:
    """Write the task's images under ``workdir`` and return its config for that folder,
    the image counts and where the images are.

    Args:
        workdir: the demo's folder (images, features, runs, model, report).
        task: ``"surfaces"`` or ``"digits"``.
        per_class: a smaller version: at most this many images a class (surfaces: this
            many training and half as many test patches; digits: this many digits, 75/25).
        epochs: exactly this many epochs (default: early stopping).
    """
    if task not in TASKS:
        raise CliError(2, f"demo task {task!r} is not one of {', '.join(TASKS)}")
    workdir = os.path.abspath(workdir)
    data = task if per_class is None else f"{task}-{per_class}"
    where = os.path.join(workdir, data)
    if task == "digits":
        counts = write_digits(where, per_class=per_class)
    else:
        counts = write_surfaces(where) if per_class is None else write_surfaces(where, per_class, max(1, per_class // 2))
    cfg = load_config(str(resources.files("jobs") / "configs" / TASKS[task]), base_dir=workdir)
    if per_class is not None:
        cfg = cfg.with_(data=cfg.data.model_copy(update={"train": f"{data}/train", "test": f"{data}/test"}),
                        featurize=cfg.featurize.model_copy(update={"output": f"{data}-features"}))
    if epochs is not None:
        cfg = cfg.with_(training=cfg.training.model_copy(update={"epochs": epochs}))
    return cfg, counts, where
