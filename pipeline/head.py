"""``pipeline.fit_head``: train the trainable part of a model on a feature set (DL4J's
``fitFeaturized`` on a whole data set) with the training function of
:mod:`pipeline.train`, in Ray Train's local mode or on Ray Train workers.

Modes (``resources.num_workers``, see :class:`~pipeline.Resources`):

* ``0``: Ray Train V2's local mode (``ScalingConfig(num_workers=0)``): the training
  function runs in the calling process, without worker actors or a Ray session. The
  features are read from their Parquet shards into memory once (Ray Data would start a
  streaming execution every epoch, which costs more than an epoch of a small head).
  Ray Train's local mode keeps no checkpoints, so freezeray writes them itself to
  ``storage/name/checkpoint_<time>``, where Ray Train would (see :mod:`pipeline.checkpoints`):
  after the last epoch, and during the run at most every
  :data:`LOCAL_CHECKPOINT_EVERY_S` seconds (an epoch of a small head takes milliseconds,
  a checkpoint about ten).
* ``N >= 1``: a ``TorchTrainer`` with N workers and DDP. The feature set is materialized
  in the object store and split on the driver into one equal part per worker
  (``Dataset.split(equal=True)``: up to ``N - 1`` rows are left out of each epoch, as with
  ``DistributedSampler(drop_last=True)``). Each worker holds its part in memory when it
  is under :data:`WORKER_MEMORY_BYTES` (else it streams it with a seeded local shuffle
  buffer).
* ``None`` (the default): local mode when the features (as float32) take at most
  :func:`local_limit_bytes` (a quarter of the driver's available memory, at most 2 GiB)
  and no GPU is asked for; otherwise one worker per GPU (``resources.use_gpu``) or per CPU of the
  cluster. The choice is logged.

In both modes each epoch shuffles with a permutation seeded by (seed, epoch, rank), so a
1-worker run and a local run give the same weights. With N workers each worker shuffles
its own part and the gradients of the N batches are averaged, so N workers with
``Batches(batch_size=B)`` take the same steps as one process with batch N*B only when the batches
hold the same rows, i.e. without shuffling and with full batches; otherwise the results
differ by the order of the rows (tested both ways).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx

import surgery
from surgery.helper import split
from surgery.training.config import FineTuneConfiguration
from surgery.training.objective import check_targets, loss_specs

from .features import FeatureSet, split_rows
from .options import Batches, Run, Stopping
from .resources import Resources
from .runs import claim_run, data_definition, features_definition, fine_tune_definition, model_definition
from .stream import plan_stream
from .train import (
    FitResult,
    TrainSettings,
    _fmt,
    _to_tensors,
    default_storage,
    finish,
    run_name,
    run_trainer,
    seed_of,
    worker_memory_bytes,
)

__all__ = ["fit_head", "open_features", "feature_tensors", "default_batch_size", "local_limit_bytes", "choose_workers", "AUTO_VALIDATION"]

log = logging.getLogger(__name__)

AUTO_VALIDATION = 0.1  # share of the rows held out when epochs=None and no validation is given


def default_batch_size(rows: int) -> int:
    """The batch size ``fit_head`` uses when none is given: about 64 steps an epoch, as a
    power of two between 16 and 512 (1,200 rows -> 16; 8,000 -> 128; 100,000 -> 512).
    Small sets then get enough steps per epoch to converge in tens of epochs (on the
    demo's 1,212 rows, batch 16 reached 0.2 points more held-out accuracy than 32 and 0.6
    more than 64); large ones keep steps efficient."""
    target = max(1, rows // 64)
    return int(min(512, max(16, 2 ** round(math.log2(target)))))


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError):
        return 8 << 30


def local_limit_bytes() -> int:
    """The most feature bytes (as float32) that automatic mode trains in the calling
    process: a quarter of the memory available now, at most 2 GiB (override:
    ``FREEZERAY_LOCAL_LIMIT_BYTES``)."""
    override = os.environ.get("FREEZERAY_LOCAL_LIMIT_BYTES")
    if override:
        return int(float(override))
    return int(min(2 << 30, _available_memory() // 4))


def choose_workers(num_workers: int | None, use_gpu: bool, feature_bytes: int, cpus_per_worker: float = 1.0) -> int:
    """Ray Train workers for a run (0: local mode); see the module docstring for the rule."""
    if num_workers is not None:
        if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0:
            raise ValueError(f"num_workers must be a non-negative integer (0: local mode) or None, got {num_workers!r}")
        return num_workers
    limit = local_limit_bytes()
    if not use_gpu and feature_bytes <= limit:
        log.info("fit_head: local mode (features %.1f MB <= %.1f MB, no GPU asked for)", feature_bytes / 1e6, limit / 1e6)
        return 0
    from .runtime import cluster_cpus, cluster_gpus

    workers = int(cluster_gpus()) if use_gpu else int(cluster_cpus() // max(cpus_per_worker, 1e-9))
    workers = max(1, workers)
    log.info("fit_head: %d Ray Train workers (features %.1f MB %s)", workers, feature_bytes / 1e6,
             "on GPUs" if use_gpu else f"> {limit / 1e6:.1f} MB for local mode")
    return workers


def open_features(features: str | FeatureSet, storage_options: dict | None) -> FeatureSet:
    return features if isinstance(features, FeatureSet) else FeatureSet.open(str(features), storage_options)


def feature_tensors(fset: FeatureSet, columns: tuple[str, ...]) -> dict[str, np.ndarray]:
    table = fset.read(["row_id", "label", *columns])
    return {name: (table.column(name).combine_chunks().to_numpy_ndarray() if name in columns
                   else table.column(name).to_numpy()) for name in ["row_id", "label", *columns]}


def fit_head(
    model: fx.GraphModule,
    features: str | FeatureSet,
    *,
    validation: str | FeatureSet | float | None = None,
    stopping: Stopping | None = None,
    batches: Batches | None = None,
    resources: Resources | None = None,
    run: Run | None = None,
) -> FitResult:
    """Train the unfrozen part of ``model`` on a feature set (DL4J's ``fitFeaturized``, on
    a whole data set) with Ray Train, and return the model with the best epoch's weights.

    Args:
        model: a freezeray model whose frozen part made ``features``.
        features: a committed feature-set URI or :class:`FeatureSet`.
        validation: a feature-set URI / ``FeatureSet``, or a fraction of ``features`` held
            out by a seeded split on row ids; None with ``stopping.epochs=None``: a tenth.
        stopping: when training ends (:class:`~pipeline.Stopping`); left out: until the
            validation loss has not improved for 20 epochs, at most 200.
        batches: batch size, shuffling and seed (:class:`~pipeline.Batches`); the batch
            size left out is :func:`default_batch_size` of the training rows.
        resources: Ray Train's workers (:class:`~pipeline.Resources`): ``num_workers`` 0 is
            local mode, in this process; None (the default) is local mode when the
            features fit comfortably in memory and no GPU is asked for (:func:`choose_workers`).
        run: name, storage, storage options, failures, callback (:class:`~pipeline.Run`); a
            run with an existing name and the same definition resumes.

    Returns:
        a :class:`FitResult`: the full model with the best epoch's weights (by validation
        loss, else training loss), the per-epoch history and the checkpoint location.

    Raises:
        FeatureMismatch: features made by another frozen graph (before any training).
        RunMismatch: ``run.name`` holds a run with another definition (and not ``overwrite``).
        ValueError: zero rows, labels the output cannot score, or a loss that does not fit
            class labels.

    Example:
        >>> result = pipeline.fit_head(model, "s3://bucket/features/train", run=Run(storage_options=opts))
        >>> result.best_epoch, result.metrics["val_accuracy"]
    """
    started = time.perf_counter()
    job = _HeadJob.plan(model, features, validation, stopping or Stopping(), (batches or Batches()).for_features(),
                        resources or Resources(), run or Run())
    resumed = claim_run(job.settings.storage, job.settings.run, "fit_head", job.definition,
                        job.run.storage_options, job.run.overwrite)  # before anything is trained
    out = finish(model, job.train(), job.settings, started)
    out.resumed = resumed
    log.info("fit_head %s (%s): %d epochs, best epoch %s: %s", out.run,
             "local mode" if job.workers == 0 else f"{job.workers} workers", len(out.history), out.best_epoch,
             _fmt(out.metrics))
    return out


@dataclass
class _HeadJob:
    """One ``fit_head`` call, checked and planned: where its rows come from, how many
    workers train them and the settings every worker gets."""

    head: fx.GraphModule
    fset: FeatureSet
    val_set: FeatureSet | None
    validation: Any  # None, a fraction, or the validation set's URI/FeatureSet
    workers: int
    use_gpu: bool
    cpus_per_worker: float
    run: Run
    settings: TrainSettings
    definition: dict[str, Any]

    @classmethod
    def plan(cls, model: fx.GraphModule, features: str | FeatureSet, validation: Any, stopping: Stopping,
             batches: Batches, resources: Resources, run: Run) -> "_HeadJob":
        fset = open_features(features, run.storage_options)
        fset.check(model)
        if fset.rows == 0:
            raise ValueError(f"the feature set at {fset.uri!r} has zero rows: nothing to train on")
        specs = loss_specs(model)
        check_targets(specs, len(fset.classes) or None)
        head = split(model).unfrozen
        if not any(p.requires_grad for p in head.parameters()):
            raise ValueError("the model has nothing trainable after its frozen boundary")
        validation, val_set = _validation(model, fset, validation, stopping, run.storage_options)
        num_workers, use_gpu, cpus_per_worker = resources.for_training()
        row_bytes = 4 * sum(math.prod(s) for s in fset.feature_shapes)
        workers = choose_workers(num_workers, use_gpu, row_bytes * (fset.rows + (val_set.rows if val_set else 0)),
                                 cpus_per_worker)
        seed = seed_of(model, batches.seed)
        train_rows = int(fset.rows * (1 - validation)) if isinstance(validation, float) else fset.rows
        batch = batches.batch_size if batches.batch_size is not None else default_batch_size(train_rows // max(workers, 1))
        name, where = run_name(run.name, "fit_head"), run.storage or default_storage()
        definition = {**model_definition(model, head), "features": features_definition(fset),
                      "fine_tune": fine_tune_definition(model), "batch_size": batch, "shuffle": batches.shuffle,
                      "seed": seed, "validation": data_definition(val_set if val_set is not None else validation)}
        in_memory = row_bytes * fset.rows / max(workers, 1) <= worker_memory_bytes()
        stream = None
        if workers and not in_memory:  # past a worker's memory: each worker streams its own shards from storage
            stream = plan_stream(fset, val_set if val_set is not None else validation, workers, batch, seed,
                                 batches.shuffle, run.storage_options)
            log.info("fit_head: streaming %d training shards (%d held out) to %d workers, checkpoints every %d steps",
                     len(stream.shards), len(stream.validation), workers, stream.checkpoint_steps)
        settings = TrainSettings(
            stopping=stopping.to_dict(), batch_size=batch, shuffle=batches.shuffle, seed=seed, inputs="features",
            feature_columns=fset.feature_columns, preprocessing=None, losses=tuple(s.to_dict() for s in specs),
            fine_tune=(surgery.get_info(model).fine_tune or FineTuneConfiguration()).to_dict(),
            validation=validation is not None, world_size=workers, run=name, storage=where, in_memory=in_memory,
            stream=stream.to_dict() if stream is not None else None,
        )
        return cls(head, fset, val_set, validation, workers, use_gpu, cpus_per_worker, run, settings, definition)

    def train(self) -> Any:
        """Ray Train's ``Result``: local mode, streaming workers, or workers with their parts in memory."""
        s, run = self.settings, self.run
        if self.workers == 0:
            return run_trainer(self.head, s, tensors=_local_tensors(self.fset, self.val_set, self.validation, s),
                               use_gpu=self.use_gpu, storage_options=run.storage_options, callback=run.callback)
        if s.stream is not None:
            return run_trainer(self.head, s, use_gpu=self.use_gpu, cpus_per_worker=self.cpus_per_worker,
                               storage_options=run.storage_options, max_failures=run.max_failures,
                               callback=run.callback)
        return _run_workers(self.head, self.fset, self.val_set, self.validation, s, self.use_gpu,
                            self.cpus_per_worker, run)


def _validation(model: fx.GraphModule, fset: FeatureSet, validation: Any, stopping: Stopping,
                storage_options: dict | None) -> tuple[Any, FeatureSet | None]:
    """``(validation, its feature set)``: a fraction (a tenth when early stopping has
    nothing else to measure on), or a checked feature set with the training classes."""
    if validation is None and stopping.epochs is None:
        log.info("fit_head: epochs=None stops on the validation loss; holding out a seeded %.0f%% of the rows",
                 100 * AUTO_VALIDATION)
        return AUTO_VALIDATION, None
    if isinstance(validation, float):
        if not 0.0 < validation < 1.0:
            raise ValueError(f"validation as a fraction must be in (0, 1), got {validation}")
        return validation, None
    if validation is None:
        return None, None
    val_set = open_features(validation, storage_options)
    val_set.check(model)
    if val_set.classes != fset.classes:
        raise ValueError(f"validation classes {val_set.classes} differ from training classes {fset.classes}")
    return validation, val_set


def _local_tensors(fset: FeatureSet, val_set: FeatureSet | None, validation: Any, s: TrainSettings) -> dict[str, Any]:
    """Training (and validation) features read into memory, split like the workers split them."""
    cpu = torch.device("cpu")
    table = feature_tensors(fset, s.feature_columns)
    tensors: dict[str, Any] = {}
    if isinstance(validation, float):
        tensors["train"] = _to_tensors(split_rows(table, validation, s.seed, "train"), s, cpu)
        tensors["validation"] = _to_tensors(split_rows(table, validation, s.seed, "validation"), s, cpu)
    else:
        tensors["train"] = _to_tensors(table, s, cpu)
        if val_set is not None:
            tensors["validation"] = _to_tensors(feature_tensors(val_set, s.feature_columns), s, cpu)
    return tensors


def _run_workers(head: fx.GraphModule, fset: FeatureSet, val_set: FeatureSet | None, validation: Any,
                 s: TrainSettings, use_gpu: bool, cpus_per_worker: float, run: Run) -> Any:
    import ray.train

    from .runtime import ensure_ray

    ensure_ray()
    columns = ["row_id", "label", *s.feature_columns]
    train_ds = fset.to_dataset().select_columns(columns)
    val_ds = val_set.to_dataset().select_columns(columns) if val_set is not None else None
    if isinstance(validation, float):
        kw = {"fraction": validation, "seed": s.seed}
        val_ds = train_ds.map_batches(split_rows, fn_kwargs={**kw, "keep": "validation"}, batch_format="numpy")
        train_ds = train_ds.map_batches(split_rows, fn_kwargs={**kw, "keep": "train"}, batch_format="numpy")
    datasets = _split_for_workers(train_ds, "train", s.world_size, equal=True)
    if val_ds is not None:
        datasets.update(_split_for_workers(val_ds, "validation", s.world_size, equal=False))
    return run_trainer(head, s, datasets=datasets, dataset_config=ray.train.DataConfig(datasets_to_split=[]),
                       use_gpu=use_gpu, cpus_per_worker=cpus_per_worker, storage_options=run.storage_options,
                       max_failures=run.max_failures, callback=run.callback)


def _split_for_workers(ds: Any, prefix: str, n: int, equal: bool) -> dict[str, Any]:
    """Materialize ``ds`` in block order and split it into one dataset per worker, on the
    driver, before Train reserves the workers' CPUs."""
    ds.context.execution_options.preserve_order = True
    parts = ds.materialize().split(n, equal=equal)
    for p in parts:  # epochs re-read these many times: no progress bar per pass
        p.context.enable_progress_bars = False
    return {f"{prefix}_{i}": p for i, p in enumerate(parts)}
