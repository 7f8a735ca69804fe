"""``pipeline.finetune``: train the whole model from raw images (DL4J's "fine-tune from
block four"): every unfrozen layer trains, frozen layers stay frozen. Decoding,
preprocessing and the standard training augmentation (random resized crop, flip) run in
Ray Data tasks; the training function and loop are the ones ``fit_head`` uses
(:mod:`pipeline.train`), streaming decoded images (``streaming_split``) instead of
features. Not bitwise reproducible across worker counts.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import numpy as np
import torch.fx as fx

import surgery
from surgery.finetune import FineTuneConfiguration
from surgery.objective import check_targets, loss_specs
from surgery.training import DEFAULT_MAX_EPOCHS, Stopping

from .features import split_rows
from .head import AUTO_VALIDATION
from .resources import Resources
from .train import (
    FitResult,
    TrainSettings,
    _fmt,
    default_storage,
    finish,
    run_name,
    run_trainer,
    seed_of,
    training_resources,
)

__all__ = ["finetune"]

log = logging.getLogger(__name__)


def finetune(
    model: fx.GraphModule,
    source: Any,
    *,
    epochs: int | None = None,
    batch_size: int = 32,
    num_workers: int | None = None,
    use_gpu: bool = False,
    validation: Any = None,
    augment: bool = True,
    image_size: int | None = None,
    storage: str | None = None,
    name: str | None = None,
    storage_options: dict[str, Any] | None = None,
    resources: Resources | None = None,
    shuffle: bool = True,
    seed: int | None = None,
    early_stopping_patience: int | None = None,
    max_epochs: int = DEFAULT_MAX_EPOCHS,
    max_failures: int = 0,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> FitResult:
    """Train the whole model from raw images; frozen layers stay frozen.

    Arguments are as for :func:`pipeline.fit_head`; ``source``/``validation`` are image
    folders, manifests or :class:`ImageSource`s, ``image_size`` overrides the input size.
    ``num_workers=0`` trains in this process (Ray Train's local mode; decoding still runs
    in Ray Data tasks, streamed every epoch); None (the default) is one Ray Train worker
    per GPU with ``use_gpu``, else local mode. ``epochs=None`` (the default) trains until
    the validation loss (training loss without validation) stops improving. The
    returned model holds the best epoch's weights.
    """
    import ray.train

    from surgery.preprocess import model_preprocessing

    from .runtime import ensure_ray
    from .sources import ImageSource, image_dataset, read_images

    started = time.perf_counter()
    src = source if isinstance(source, ImageSource) else read_images(source, storage_options)
    if len(src) == 0:
        raise ValueError("the image source has zero rows: nothing to train on")
    if not src.labeled:
        raise ValueError(f"{src.uri!r} has unlabeled images; finetune needs a label for every image")
    specs = loss_specs(model)
    check_targets(specs, len(src.classes), src.labels)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has nothing trainable: everything is frozen")
    num_workers, use_gpu, cpus_per_worker = training_resources(num_workers, use_gpu, resources)
    if num_workers is None:
        from .runtime import cluster_gpus

        num_workers = max(1, int(cluster_gpus())) if use_gpu else 0
    if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0:
        raise ValueError(f"num_workers must be a non-negative integer (0: local mode), got {num_workers!r}")
    seed = seed_of(model, seed)
    if validation is None and epochs is None:  # early stopping needs held-out images: a seeded tenth, as fit_head
        ids = src.table.column("row_id").to_numpy()
        rows = {"row_id": ids, "position": np.arange(len(ids))}
        validation = src.subset(split_rows(rows, AUTO_VALIDATION, seed, "validation")["position"])
        src = src.subset(split_rows(rows, AUTO_VALIDATION, seed, "train")["position"])
        log.info("finetune: epochs=None stops on the validation loss; holding out a seeded %.0f%% of the images (%d)",
                 100 * AUTO_VALIDATION, len(validation))
    config = model_preprocessing(model, None, image_size)
    settings = TrainSettings(
        stopping=Stopping(epochs, early_stopping_patience, max_epochs).to_dict(), batch_size=batch_size, shuffle=shuffle,
        seed=seed, inputs="pixels", feature_columns=(), preprocessing=config.to_dict(),
        losses=tuple(s.to_dict() for s in specs),
        fine_tune=(surgery.get_info(model).fine_tune or FineTuneConfiguration()).to_dict(),
        validation=validation is not None, world_size=num_workers, run=run_name(name, "finetune"),
        storage=storage or default_storage(), in_memory=False,
    )
    ensure_ray()
    datasets = {"train": image_dataset(src, config, augment, settings.seed)}
    if validation is not None:
        val_src = validation if isinstance(validation, ImageSource) else read_images(validation, storage_options, classes=src.classes)
        datasets["validation"] = image_dataset(val_src, config, False, settings.seed)
    result = run_trainer(model, settings, datasets=datasets, dataset_config=ray.train.DataConfig(datasets_to_split="all"),
                         use_gpu=use_gpu, cpus_per_worker=cpus_per_worker, storage_options=storage_options,
                         max_failures=max_failures, callback=callback)
    out = finish(model, result, settings, started)
    log.info("finetune %s: %d epochs, best epoch %s: %s", out.run, len(out.history), out.best_epoch, _fmt(out.metrics))
    return out
