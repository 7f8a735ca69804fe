"""Baselines beside every transfer result, so that a reader sees at once whether transfer
helped: the same evaluation, on the same split, for

* **pixels**: a linear model on the images downsampled to 32x32 — the model's own
  preprocessed input averaged down (``AdaptiveAvgPool2d(32)`` + ``Flatten``, frozen),
  then a new ``Output`` layer: multinomial logistic regression on 3,072 pixel values;
* **random backbone**: the run's model with every frozen tensor re-drawn from the
  architecture's own random initialisation (the zoo model built with ``weights=None``,
  seeded by the fine-tune configuration's seed), with the head exactly as the run builds
  it (the same layers and initialisation).

Each is trained as the transfer result's head is (``pipeline.fit_head`` with the run's
training settings: epochs, batch size, early stopping on the run's validation fraction,
or on a seeded tenth when the run validates on a folder) and scored on its test features.

Why ``pipeline.featurize`` and ``fit_head`` rather than a forward pass and a scikit-learn
model on the driver: a random backbone has to run over every image it is trained and
tested on, as costly as the transfer run's own featurization. Featurizing spreads that
over the cluster's model actors, reads every image source freezeray reads (folders,
manifests, tar and Parquet shards), and commits feature sets that the next run reuses
(the seeded backbone has the same weights, hence the same fingerprint, every time); and
it makes "the same head" literal: the same layer trained by the same loop. To bound the
cost on large sets, both baselines see a seeded sample of at most ``report.baseline_rows``
train and test images (default 2,000 each, about a point of sampling error); loose files
are sampled at random, shard formats by whole shards in order (their rows are known only
once read). ``report.baselines: false`` skips them.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx
from torch import nn

import pipeline
import surgery
from freezeray import storage
from surgery import TransferLearning
from surgery.layers import Output

from .config import RunConfig

__all__ = ["Baseline", "compute_baselines", "pixel_model", "random_backbone", "sample", "PIXELS", "RANDOM", "PIXEL_SIDE"]

PIXELS = "pixels"
RANDOM = "random backbone"
PIXEL_SIDE = 32  # the images are averaged down to PIXEL_SIDE x PIXEL_SIDE for the pixel baseline


@dataclass(frozen=True)
class Baseline:
    """One baseline's result, for the report and the CLI's last lines."""

    name: str  # PIXELS or RANDOM
    what: str  # what was trained on what, for people
    accuracy: float | None  # on the (sampled) test images; None when skipped
    train_rows: int = 0  # training images it saw (a held-out part of them validates)
    test_rows: int = 0  # test images it was scored on
    of_test: int = 0  # test images of the run (more than test_rows when sampled)
    seconds: float = 0.0  # featurize + fit + evaluate
    reused: bool = False  # both feature sets were committed by an earlier run
    skipped: str | None = None  # why there is no number

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pixel_model(model: fx.GraphModule, n_out: int, side: int = PIXEL_SIDE) -> fx.GraphModule:
    """A linear model on ``model``'s preprocessed input averaged down to ``side`` x ``side``:
    ``AdaptiveAvgPool2d`` + ``Flatten`` (frozen, nothing to learn) and a new ``Output``."""
    info = surgery.get_info(model)
    base = surgery.from_module(nn.Sequential(nn.AdaptiveAvgPool2d(side), nn.Flatten()),
                               preprocessing=info.preprocessing, name=f"pixels{side}")
    return (TransferLearning(base).set_feature_extractor("1")
            .add_layer("classifier", Output(n_out, loss="cross_entropy"), "1").set_outputs("classifier").build())


def random_backbone(model: fx.GraphModule, seed: int = 0) -> fx.GraphModule:
    """``model`` with every tensor of its frozen part (parameters and BatchNorm statistics)
    taken from the same zoo architecture built with random weights (``weights=None``,
    under ``torch.manual_seed(seed)``: the same weights every time); the trainable part,
    the head, is left as it is. A new model; ``model`` is untouched.

    Raises:
        ValueError: the model is not a zoo architecture (ONNX files and ``from_module``
            models have no random initialisation of their own), or a frozen tensor has no
            counterpart of the same name and shape in the random model.
    """
    import copy

    info = surgery.get_info(model)
    if info.origin != "zoo" or info.name == "onnx":
        raise ValueError(f"{info.name!r} is not a zoo architecture (origin {info.origin!r}): it has no random "
                         "initialisation of its own to compare with")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        fresh = surgery.zoo.load(info.name, weights=None, **info.base_kwargs).state_dict()
    twin = copy.deepcopy(model)
    trainable = {name for name, m in twin.named_modules() if any(p.requires_grad for p in m.parameters(recurse=False))}
    missing = []
    with torch.no_grad():
        for key, tensor in twin.state_dict().items():
            if key.rpartition(".")[0] in trainable:
                continue  # the head: as the run builds it
            if key in fresh and fresh[key].shape == tensor.shape:
                tensor.copy_(fresh[key])
            else:
                missing.append(key)
    if missing:
        raise ValueError(f"{len(missing)} frozen tensors of the model have no counterpart in a random {info.name} "
                         f"(first: {', '.join(missing[:3])}); the surgery changed the frozen part")
    return twin


def sample(src: Any, rows: int, seed: int = 0) -> Any:
    """At most ``rows`` images of an image source: loose files at random (seeded, in
    their listed order), shard formats by whole shards in order until ``rows`` are reached
    (a shard whose row count is unknown until read ends the sample)."""
    if not src.sharded:
        if len(src) <= rows:
            return src
        return src.subset(np.sort(np.random.default_rng(seed).choice(len(src), rows, replace=False)))
    kept, total = [], 0
    for shard in src.shards:
        kept.append(shard)
        total += shard.rows if shard.rows is not None else rows
        if total >= rows:
            break
    return dataclasses.replace(src, shards=tuple(kept))


def _rows(src: Any) -> int:
    return src.rows if src.rows is not None else 0


def compute_baselines(cfg: RunConfig, model: fx.GraphModule, train: Any, test: Any, output: str,
                      storage_uri: str | None, progress: Callable[[str, dict[str, Any]], None] | None = None) -> list[Baseline]:
    """Both baselines for ``model`` (as built, before training) on the run's ``train`` and
    ``test`` image sources, their features under ``output`` (``pixels/``, ``random/``),
    their runs in ``storage_uri``. A baseline that cannot run says why in ``skipped``."""
    seed = cfg.training.seed if cfg.training.seed is not None else (cfg.fine_tune.seed if cfg.fine_tune and
                                                                    cfg.fine_tune.seed is not None else 0)
    n = cfg.report.baseline_rows
    of_test = _rows(test)
    train, test = sample(train, n, seed), sample(test, n, seed)
    n_out = len(train.classes)
    makers: list[tuple[str, str, Callable[[], fx.GraphModule]]] = [
        (PIXELS, f"a linear model on the images at {PIXEL_SIDE}x{PIXEL_SIDE} pixels", lambda: pixel_model(model, n_out)),
        (RANDOM, f"the same head on a randomly initialised {surgery.get_info(model).name}", lambda: random_backbone(model, seed)),
    ]
    if progress is not None:
        progress("baselines", {"event": "start", "total": 2 * (_rows(train) + _rows(test)), "unit": "images"})

    def rows(r: int, e: int) -> None:
        if progress is not None:
            progress("baselines", {"event": "rows", "rows": r + e})

    t, opts = cfg.training, cfg.data.storage_options or None
    validation = cfg.data.validation if isinstance(cfg.data.validation, float) else 0.1
    results = []
    for name, what, make in makers:
        try:
            baseline_model = make()
        except ValueError as exc:
            results.append(Baseline(name, what, None, skipped=str(exc)))
            continue
        started = time.perf_counter()
        kind = "random" if name == RANDOM else "pixels"
        folder = storage.join(output, kind)
        sets = {split: _featurize(cfg, baseline_model, src, storage.join(folder, split), rows)
                for split, src in (("train", train), ("test", test))}
        # a named run: the next run with the same features and settings returns it as it is;
        # another definition under the name (new features, other settings) trains it again
        fit = pipeline.fit_head(baseline_model, sets["train"], validation=validation, stopping=t.stopping(),
                                batches=pipeline.Batches(batch_size=t.batch_size, seed=seed),
                                resources=t.resources if t.mode == "head" else None,
                                run=pipeline.Run(name=kind, storage=storage_uri, storage_options=opts, overwrite=True))
        ev = pipeline.evaluate(fit.model, sets["test"], storage_options=opts)
        results.append(Baseline(name, what, float(ev.accuracy), sets["train"].rows, ev.rows, of_test,
                                time.perf_counter() - started, all(s.reused for s in sets.values())))
    if progress is not None:
        ran = [b for b in results if b.skipped is None]
        progress("baselines", {"event": "end", "reused": bool(ran) and all(b.reused for b in ran)})
    return results


def _featurize(cfg: RunConfig, model: fx.GraphModule, src: Any, output: str, rows: Callable[[int, int], None]) -> Any:
    f = cfg.featurize
    # a baseline's features are the report's own cache: another fingerprint there (another
    # seed or sample) is replaced, never refused
    return pipeline.featurize(model, src, output, storage_options=cfg.data.storage_options or None, image_size=f.image_size,
                              dtype=f.dtype, batch_size=f.batch_size, resources=f.resources, overwrite=True,
                              progress=lambda s, r, e: rows(r, e))
