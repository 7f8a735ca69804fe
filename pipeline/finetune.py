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

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch.fx as fx

import surgery
from surgery.training.config import FineTuneConfiguration
from surgery.training.objective import check_targets, loss_specs

from .head import AUTO_VALIDATION
from .options import Batches, Run, Stopping
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
)

__all__ = ["finetune"]

log = logging.getLogger(__name__)


def finetune(
    model: fx.GraphModule,
    source: Any,
    *,
    validation: Any = None,
    stopping: Stopping | None = None,
    batches: Batches | None = None,
    resources: Resources | None = None,
    run: Run | None = None,
    stages: Sequence[Stage | dict[str, Any]] | None = None,
) -> FitResult:
    """Train the model from raw images; frozen layers stay frozen.

    Arguments are as for :func:`pipeline.fit_head`; ``source``/``validation`` are image
    folders, manifests or :class:`ImageSource`s. ``batches`` also holds the augmentation
    (``augment``: True or None, torchvision's standard recipe, ``RandomResizedCrop`` and
    ``RandomHorizontalFlip``, drawn afresh every epoch and seeded by (seed, epoch, row); a
    list of ``transforms.v2`` objects or names, see :mod:`surgery.training.augment`;
    False: none) and ``image_size`` (another input size); its batch size defaults to 32.
    ``resources.num_workers=0`` trains in this process (Ray Train's local mode; decoding
    still runs in Ray Data tasks, streamed every epoch); None (the default) is one Ray
    Train worker per GPU with ``use_gpu``, else local mode. ``Stopping()`` (the default)
    trains until the validation loss (on a seeded tenth of the images held out, when no
    ``validation`` is given) stops improving. The returned model holds the best epoch's
    weights. Mixed precision: the fine-tune configuration's ``mixed_precision``.

    Args:
        stages: staged fine-tuning (:class:`~pipeline.Stage` or dicts): each stage's frozen
            set, epochs (default: ``stopping.epochs``) and learning rates, run one after
            the other, each from the previous stage's best weights; stage ``i``'s
            checkpoints are the run ``<name>-stage<i>``. A first stage with ``features``
            (a feature set its frozen part made) trains on them (``fit_head``), not on images.
            ``run.overwrite`` deletes and trains again a stage run with another definition
            (a stage's definition holds the weights it starts from, so every stage after
            a changed one is another run too).

    Example:
        >>> pipeline.finetune(model, "s3://b/train", run=Run(name="flowers"), stages=[
        ...     Stage(frozen="global_pool", features="s3://b/features/train"),
        ...     Stage(unfreeze=("blocks.6", "conv_head", "bn2"), lr=1e-4)])
    """
    started = time.perf_counter()
    stopping, batches, run = stopping or Stopping(), batches or Batches(), run or Run()
    job = _Job.plan(model, resources or Resources(), batches, run)
    src = _source(model, source, run.storage_options)
    plan = _plan_stages(stages)
    if not plan:
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("the model has nothing trainable: everything is frozen")
        train, val = _split(src, validation, stopping.epochs, job.seed, run.storage_options)
        out = _from_images(model, train, val, job, stopping, batches.batch_size or 32, job.name, run.callback)
        out.seconds = time.perf_counter() - started
        log.info("finetune %s: %d epochs, best epoch %s: %s", out.run, len(out.history), out.best_epoch, _fmt(out.metrics))
        return out
    counted = stopping.epochs if all(s.epochs for s in plan) else None  # a stage without epochs stops early
    train, val = _split(src, validation, counted, job.seed, run.storage_options)

    def stage_stopping(stage: Stage) -> Stopping:
        return dataclasses.replace(stopping, epochs=stage.epochs or stopping.epochs)

    def images(m: fx.GraphModule, stage: Stage, stage_run: str, cb: Callable | None) -> FitResult:
        return _from_images(m, train, val, job, stage_stopping(stage), stage.batch_size or batches.batch_size or 32,
                            stage_run, cb, stage=stage)

    def on_features(m: fx.GraphModule, stage: Stage, stage_run: str, cb: Callable | None) -> FitResult:
        from .head import fit_head

        return fit_head(m, stage.features, stopping=stage_stopping(stage),
                        batches=Batches(batch_size=stage.batch_size, shuffle=batches.shuffle, seed=job.seed),
                        resources=Resources(num_workers=job.workers, use_gpu=job.use_gpu),
                        run=dataclasses.replace(run, name=stage_run, storage=job.storage, callback=cb))

    out = run_stages(model, plan, images, run=job.name, fit_features=on_features, callback=run.callback)
    out.seconds = time.perf_counter() - started
    log.info("finetune %s: %d stages, %d epochs; last stage's best epoch %s: %s", job.name, len(out.stages),
             len(out.history), out.best_epoch, _fmt(out.metrics))
    return out


def _source(model: fx.GraphModule, source: Any, storage_options: dict | None) -> Any:
    """The training images, checked: rows, a label for each, labels the output can score."""
    from .sources import ImageSource, read_images

    src = source if isinstance(source, ImageSource) else read_images(source, storage_options)
    if src.rows == 0:
        raise ValueError("the image source has zero rows: nothing to train on")
    if not src.labeled:
        raise ValueError(f"{src.uri!r} has unlabeled images; finetune needs a label for every image")
    check_targets(loss_specs(model), len(src.classes) or None, None if src.sharded else src.labels)
    return src


def _plan_stages(stages: Sequence[Stage | dict[str, Any]] | None) -> list[Stage]:
    if stages is None:
        return []
    if len(stages) == 0:
        raise ValueError("stages is empty: give at least one Stage (or stages=None for one run)")
    plan = [s if isinstance(s, Stage) else Stage.from_dict(s) for s in stages]
    later = [i for i, s in enumerate(plan) if i and s.features is not None]
    if later:
        raise ValueError(f"stage {later[0]} has features; only the first stage can train on a feature set "
                         "(the later ones start from weights the features were not made with)")
    return plan


@dataclass(frozen=True)
class _Job:
    """What every run of one ``finetune`` call shares: workers, seed, storage, augmentation."""

    workers: int
    use_gpu: bool
    cpus_per_worker: float
    shuffle: bool
    seed: int
    name: str
    storage: str
    run: Run
    image_size: int | None
    augment: tuple[Any, ...] | None

    @classmethod
    def plan(cls, model: fx.GraphModule, resources: Resources, batches: Batches, run: Run) -> "_Job":
        from surgery.training.augment import check_augment

        transforms = check_augment(True if batches.augment is None else batches.augment)
        num_workers, use_gpu, cpus_per_worker = resources.for_training()
        if num_workers is None:
            from .runtime import cluster_gpus

            num_workers = max(1, int(cluster_gpus())) if use_gpu else 0
        if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0:
            raise ValueError(f"num_workers must be a non-negative integer (0: local mode), got {num_workers!r}")
        return cls(num_workers, use_gpu, cpus_per_worker, batches.shuffle, seed_of(model, batches.seed),
                   run_name(run.name, "finetune"), run.storage or default_storage(), run, batches.image_size,
                   transforms)


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


def _from_images(model: fx.GraphModule, train: Any, val: Any, job: _Job, stopping: Stopping, batch_size: int,
                 run: str, callback: Callable | None, stage: Stage | None = None) -> FitResult:
    """One run of the training function on decoded images (claimed by its definition
    first, see :mod:`pipeline.runs`)."""
    import ray.train

    from surgery.recipe import model_preprocessing

    from .readers import augment_source_config, image_dataset
    from .runtime import ensure_ray

    started = time.perf_counter()
    config, augment, storage = model_preprocessing(model, None, job.image_size), job.augment, job.storage
    settings = TrainSettings(
        stopping=stopping.to_dict(), batch_size=batch_size, shuffle=job.shuffle, seed=job.seed, inputs="pixels",
        feature_columns=(), preprocessing=config.to_dict(),
        losses=tuple(s.to_dict() for s in loss_specs(model)),
        fine_tune=(surgery.get_info(model).fine_tune or FineTuneConfiguration()).to_dict(),
        validation=val is not None, world_size=job.workers, run=run, storage=storage, in_memory=False, augment=augment,
    )
    definition = {**model_definition(model), "images": images_definition(train), "validation": data_definition(val),
                  "fine_tune": fine_tune_definition(model), "batch_size": batch_size, "shuffle": job.shuffle,
                  "seed": job.seed,
                  "preprocessing": config.to_dict(), "augment": describe(augment),
                  "stage": None if stage is None else stage.model_dump(mode="json", exclude={"epochs"})}
    # claimed before anything is trained
    resumed = claim_run(storage, run, "finetune", definition, job.run.storage_options, job.run.overwrite)
    ensure_ray()
    datasets = {"train": image_dataset(train[0], augment_source_config(config) if augment is not None else config,
                                       split=train[1])}
    if val is not None:
        datasets["validation"] = image_dataset(val[0], config, split=val[1])
    result = run_trainer(model, settings, datasets=datasets, dataset_config=ray.train.DataConfig(datasets_to_split="all"),
                         use_gpu=job.use_gpu, cpus_per_worker=job.cpus_per_worker,
                         storage_options=job.run.storage_options, max_failures=job.run.max_failures, callback=callback)
    out = finish(model, result, settings, started)
    out.resumed = resumed
    return out
