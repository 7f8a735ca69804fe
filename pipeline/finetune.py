"""``pipeline.finetune``: train the model from raw images (DL4J's "fine-tune from block
four"): every unfrozen layer trains, frozen layers stay frozen; or, with ``stages``, the
head first (on a cached feature set when one is given) and then more of the backbone
(see :mod:`pipeline.stages`). Decoding and preprocessing run in Ray Data tasks; the
training augmentation (``transforms.v2``, fresh every epoch, see :mod:`surgery.training.augment`)
runs in the training function; the training function and loop are the ones ``fit_head``
uses (:mod:`pipeline.train`), streaming decoded images instead of features. Not bitwise
reproducible across worker counts.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Sequence

import torch.fx as fx

import surgery
from surgery.training import DEFAULT_MAX_EPOCHS, Stopping
from surgery.training.config import FineTuneConfiguration
from surgery.training.objective import check_targets, loss_specs

from .head import AUTO_VALIDATION
from .resources import Resources
from .runs import claim_run, data_definition, describe, fine_tune_definition, images_definition, model_definition
from .stages import Stage, run_stages
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
    augment: bool | Sequence[Any] = True,
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
    stages: Sequence[Stage | dict[str, Any]] | None = None,
    features: Any = None,
    overwrite: bool = False,
) -> FitResult:
    """Train the model from raw images; frozen layers stay frozen.

    Arguments are as for :func:`pipeline.fit_head`; ``source``/``validation`` are image
    folders, manifests or :class:`ImageSource`s, ``image_size`` overrides the input size.
    ``num_workers=0`` trains in this process (Ray Train's local mode; decoding still runs
    in Ray Data tasks, streamed every epoch); None (the default) is one Ray Train worker
    per GPU with ``use_gpu``, else local mode. ``epochs=None`` (the default) trains until
    the validation loss (on a seeded tenth of the images held out, when no
    ``validation`` is given) stops improving. The returned model holds the best epoch's
    weights. Mixed precision: the fine-tune configuration's ``mixed_precision``.

    Args:
        augment: True: torchvision's standard recipe (``RandomResizedCrop`` and
            ``RandomHorizontalFlip``), drawn afresh every epoch and seeded by (seed,
            epoch, row); a list of ``transforms.v2`` objects or names (see
            :mod:`surgery.training.augment`); False: none.
        stages: staged fine-tuning (:class:`~pipeline.Stage` or dicts): each stage's frozen
            set, epochs (default: this call's ``epochs``) and learning rates, run one
            after the other, each from the previous stage's best weights; stage ``i``'s
            checkpoints are the run ``<name>-stage<i>``.
        features: a feature set made by the first stage's frozen part: that stage then
            trains on it (``fit_head``, its own seeded validation split), not on images.
        overwrite: a run (or stage run) of the same name with another definition is
            deleted and trained again, instead of refused (:class:`~pipeline.RunMismatch`;
            a stage's definition holds its settings and the weights it starts from, so
            every stage after a changed one is another run too).

    Example:
        >>> pipeline.finetune(model, "s3://b/train", features="s3://b/features/train", name="flowers", stages=[
        ...     Stage(frozen="global_pool"), Stage(unfreeze=("blocks.6", "conv_head", "bn2"), lr=1e-4)])
    """
    started = time.perf_counter()
    from surgery.training.augment import check_augment

    from .sources import ImageSource, read_images

    transforms = check_augment(augment)
    src = source if isinstance(source, ImageSource) else read_images(source, storage_options)
    if src.rows == 0:
        raise ValueError("the image source has zero rows: nothing to train on")
    if not src.labeled:
        raise ValueError(f"{src.uri!r} has unlabeled images; finetune needs a label for every image")
    specs = loss_specs(model)
    check_targets(specs, len(src.classes) or None, None if src.sharded else src.labels)
    num_workers, use_gpu, cpus_per_worker = training_resources(num_workers, use_gpu, resources)
    if num_workers is None:
        from .runtime import cluster_gpus

        num_workers = max(1, int(cluster_gpus())) if use_gpu else 0
    if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0:
        raise ValueError(f"num_workers must be a non-negative integer (0: local mode), got {num_workers!r}")
    if stages is not None and len(stages) == 0:
        raise ValueError("stages is empty: give at least one Stage (or stages=None for one run)")
    if features is not None and not stages:
        raise ValueError("features= is for staged fine-tuning: give stages=[...] whose first stage trains on them")
    seed = seed_of(model, seed)
    run = run_name(name, "finetune")
    common = dict(workers=num_workers, use_gpu=use_gpu, cpus_per_worker=cpus_per_worker, shuffle=shuffle, seed=seed,
                  patience=early_stopping_patience, max_epochs=max_epochs, max_failures=max_failures,
                  storage=storage or default_storage(), storage_options=storage_options, image_size=image_size,
                  augment=transforms, overwrite=overwrite)
    if not stages:
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("the model has nothing trainable: everything is frozen")
        train, val = _split(src, validation, epochs, seed, storage_options)
        out = _from_images(model, train, val, epochs=epochs, batch_size=batch_size, run=run, callback=callback, **common)
        out.seconds = time.perf_counter() - started
        log.info("finetune %s: %d epochs, best epoch %s: %s", out.run, len(out.history), out.best_epoch, _fmt(out.metrics))
        return out
    train, val = _split(src, validation, epochs if all(_stage_epochs(s) for s in stages) else None, seed, storage_options)

    def images(m: fx.GraphModule, stage: Stage, stage_run: str, cb: Callable | None) -> FitResult:
        return _from_images(m, train, val, epochs=stage.epochs or epochs, batch_size=stage.batch_size or batch_size,
                            run=stage_run, callback=cb, stage=stage, **common)

    def on_features(m: fx.GraphModule, stage: Stage, stage_run: str, cb: Callable | None) -> FitResult:
        from .head import fit_head

        return fit_head(m, features, epochs=stage.epochs or epochs, batch_size=stage.batch_size,
                        num_workers=num_workers, use_gpu=use_gpu, storage=common["storage"], name=stage_run,
                        storage_options=storage_options, shuffle=shuffle, seed=seed,
                        early_stopping_patience=early_stopping_patience, max_epochs=max_epochs,
                        max_failures=max_failures, callback=cb, overwrite=overwrite)

    out = run_stages(model, stages, images, features=features, run=run, fit_features=on_features, callback=callback)
    out.seconds = time.perf_counter() - started
    log.info("finetune %s: %d stages, %d epochs; last stage's best epoch %s: %s", run, len(out.stages), len(out.history),
             out.best_epoch, _fmt(out.metrics))
    return out


def _stage_epochs(stage: Stage | dict[str, Any]) -> Any:
    return stage.epochs if isinstance(stage, Stage) else stage.get("epochs")


def _split(src: Any, validation: Any, epochs: int | None, seed: int, storage_options: dict | None) -> tuple[Any, Any]:
    """(training images, validation images or None), each ``(source, split)`` (see
    :func:`pipeline.readers.image_dataset`): early stopping without validation images holds
    out a seeded tenth, by row id, as fit_head does with features."""
    from .sources import ImageSource, read_images

    if validation is None and epochs is None:
        log.info("finetune: epochs=None stops on the validation loss; holding out a seeded %.0f%% of the images",
                 100 * AUTO_VALIDATION)
        return (src, ("train", AUTO_VALIDATION, seed)), (src, ("validation", AUTO_VALIDATION, seed))
    if validation is None:
        return (src, None), None
    val = validation if isinstance(validation, ImageSource) else read_images(validation, storage_options, classes=src.classes)
    return (src, None), (val, None)


def _from_images(model: fx.GraphModule, train: Any, val: Any, *, epochs: int | None, batch_size: int, run: str,
                 callback: Callable | None, workers: int, use_gpu: bool, cpus_per_worker: float, shuffle: bool,
                 seed: int, patience: int | None, max_epochs: int, max_failures: int, storage: str,
                 storage_options: dict | None, image_size: int | None, augment: tuple[Any, ...] | None,
                 overwrite: bool = False, stage: Stage | None = None) -> FitResult:
    """One run of the training function on decoded images (claimed by its definition
    first, see :mod:`pipeline.runs`)."""
    import ray.train

    from surgery.recipe import model_preprocessing

    from .readers import augment_source_config, image_dataset
    from .runtime import ensure_ray

    started = time.perf_counter()
    config = model_preprocessing(model, None, image_size)
    settings = TrainSettings(
        stopping=Stopping(epochs, patience, max_epochs).to_dict(), batch_size=batch_size, shuffle=shuffle,
        seed=seed, inputs="pixels", feature_columns=(), preprocessing=config.to_dict(),
        losses=tuple(s.to_dict() for s in loss_specs(model)),
        fine_tune=(surgery.get_info(model).fine_tune or FineTuneConfiguration()).to_dict(),
        validation=val is not None, world_size=workers, run=run, storage=storage, in_memory=False, augment=augment,
    )
    definition = {**model_definition(model), "images": images_definition(train), "validation": data_definition(val),
                  "fine_tune": fine_tune_definition(model), "batch_size": batch_size, "shuffle": shuffle, "seed": seed,
                  "preprocessing": config.to_dict(), "augment": describe(augment),
                  "stage": None if stage is None else stage.model_dump(mode="json", exclude={"epochs"})}
    resumed = claim_run(storage, run, "finetune", definition, storage_options, overwrite)  # before anything is trained
    ensure_ray()
    datasets = {"train": image_dataset(train[0], augment_source_config(config) if augment is not None else config,
                                       split=train[1])}
    if val is not None:
        datasets["validation"] = image_dataset(val[0], config, split=val[1])
    result = run_trainer(model, settings, datasets=datasets, dataset_config=ray.train.DataConfig(datasets_to_split="all"),
                         use_gpu=use_gpu, cpus_per_worker=cpus_per_worker, storage_options=storage_options,
                         max_failures=max_failures, callback=callback)
    out = finish(model, result, settings, started)
    out.resumed = resumed
    return out
