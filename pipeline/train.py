"""Ray Train: fit the trainable part of a model on a feature set (``fit_head``), in Ray
Train's local mode or on Ray Train workers, with one training function for both.

The epoch loop itself is :func:`surgery.training.run_epochs` (Ray-free); this module gives
it batches, checkpoints and metrics reporting, and turns the outcome into a
:class:`FitResult` whose model holds the **best** epoch's weights.

Modes (``num_workers``):

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
  and no GPU is asked for; otherwise one worker per GPU (``use_gpu``) or per CPU of the
  cluster. The choice is logged.

In both modes each epoch shuffles with a permutation seeded by (seed, epoch, rank), so a
1-worker run and a local run give the same weights. With N workers each worker shuffles
its own part and the gradients of the N batches are averaged, so N workers with
``batch_size`` B take the same steps as one process with batch N*B only when the batches
hold the same rows, i.e. without shuffling and with full batches; otherwise the results
differ by the order of the rows (tested both ways).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Callable, Literal

import numpy as np
import torch
import torch.fx as fx

import surgery
from surgery.finetune import FineTuneConfiguration
from surgery.helper import split
from surgery.objective import LossSpec, check_targets, loss_specs
from surgery.preprocess import PreprocessConfig, normalize
from surgery.training import DEFAULT_MAX_EPOCHS, Stopping, TrainState, run_epochs, tensor_batches

from .checkpoints import CheckpointError, RunFolder, checkpoint_files, read_folder, resume_from_ray, write_folder
from .features import FeatureSet, split_rows

__all__ = ["fit_head", "FitResult", "TrainSettings", "default_batch_size", "local_limit_bytes", "choose_workers",
           "WORKER_MEMORY_BYTES", "CheckpointError"]

log = logging.getLogger(__name__)

WORKER_MEMORY_BYTES = 4 << 30  # a worker holds its part of the features in memory up to this size
LOCAL_CHECKPOINT_EVERY_S = 5.0  # local mode checkpoints at most this often, and after the last epoch
AUTO_VALIDATION = 0.1  # share of the rows held out when epochs=None and no validation is given


@dataclass(frozen=True)
class TrainSettings:
    """What the training function needs besides the model and data (crosses the Ray
    boundary as a dict)."""

    stopping: dict[str, Any]  # surgery.training.Stopping as a dict
    batch_size: int  # rows per worker per step
    shuffle: bool  # a fresh permutation every epoch
    seed: int  # seeds torch and the permutations
    inputs: Literal["features", "pixels"]  # what a batch holds
    feature_columns: tuple[str, ...]  # feature columns, in the head's argument order
    preprocessing: dict[str, Any] | None  # for pixels: normalisation
    losses: tuple[dict[str, Any], ...]  # LossSpec dicts, in output order
    fine_tune: dict[str, Any]  # FineTuneConfiguration dict
    validation: bool  # whether validation data exists
    world_size: int  # workers; 0: local mode
    run: str  # run name
    storage: str  # where runs live (local mode writes its checkpoints there)
    in_memory: bool = True  # workers hold their part in memory (else stream it)
    shuffle_buffer: int = 10_000  # rows in the local shuffle buffer when streaming

    def __post_init__(self) -> None:
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        Stopping.from_dict(self.stopping)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainSettings":
        d = dict(d)
        d["feature_columns"] = tuple(d["feature_columns"])
        d["losses"] = tuple(d["losses"])
        return cls(**d)


@dataclass
class FitResult:
    """The outcome of ``fit_head`` / ``finetune``."""

    model: fx.GraphModule  # the full model with the best epoch's weights, ready for surgery.save
    history: list[dict[str, Any]]  # per-epoch metrics: loss, accuracy, val_loss, val_accuracy, lr, rows, seconds, best
    checkpoint: str | None  # URI of the latest checkpoint
    run: str  # run name (same name -> resume)
    storage: str  # where the run's checkpoints live
    seconds: float  # wall time of the whole call, start-up included
    rows_per_s: float | None = None  # training rows per second over the epochs this call ran
    metrics: dict[str, Any] = field(default_factory=dict)  # the best epoch's metrics
    best_epoch: int | None = None  # the epoch whose weights ``model`` holds
    mode: str = "local"  # "local" (Ray Train's local mode) or "workers"
    workers: int = 0  # Ray Train workers (0 in local mode)
    startup_s: float = 0.0  # seconds not spent in epochs (reading features, starting workers, checkpoints)


# ---------------------------------------------------------------------------------------
# choices the driver makes


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


# ---------------------------------------------------------------------------------------
# the training function (Ray Train calls it in the driver in local mode, in each worker otherwise)


def _allreduce(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t.tolist()


def _to_tensors(table: dict[str, np.ndarray], s: TrainSettings, device: torch.device) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    order = np.argsort(np.asarray(table["row_id"]), kind="stable")
    inputs = tuple(torch.from_numpy(np.ascontiguousarray(np.asarray(table[c])[order], dtype=np.float32)).to(device)
                   for c in s.feature_columns)
    return inputs, torch.from_numpy(np.asarray(table["label"])[order].astype(np.int64)).to(device)


def _gather(it: Any, columns: list[str]) -> dict[str, np.ndarray]:
    """A worker's whole part of a Ray dataset, as numpy columns."""
    parts: dict[str, list[np.ndarray]] = {c: [] for c in columns}
    for batch in it.iter_batches(batch_size=None, batch_format="numpy"):
        for c in columns:
            parts[c].append(np.asarray(batch[c]))
    return {c: np.concatenate(v) if v else np.zeros(0) for c, v in parts.items()}


def _streamed(it: Any, s: TrainSettings, device: torch.device, rank: int, shuffle: bool,
              config: PreprocessConfig | None) -> Callable[[int], Any]:
    def epoch_batches(epoch: int) -> Any:
        for batch in it.iter_torch_batches(batch_size=s.batch_size,
                                           local_shuffle_buffer_size=s.shuffle_buffer if shuffle else None,
                                           local_shuffle_seed=(s.seed * 1_000_003 + epoch * 101 + rank) if shuffle else None):
            if s.inputs == "features":
                x = tuple(batch[c].to(device=device, dtype=torch.float32) for c in s.feature_columns)
            else:
                x = (normalize(batch["pixels"].to(device), config),)
            yield x, batch["label"].to(device).long()

    return epoch_batches


def _data(config: dict[str, Any], s: TrainSettings, rank: int, device: torch.device) -> tuple[Callable, Callable | None]:
    """``epoch -> batches`` for training and ``() -> batches`` for validation."""
    import ray.train

    pre = PreprocessConfig.from_dict(s.preprocessing) if s.preprocessing else None
    if s.world_size == 0 and config.get("tensors") is not None:  # local mode on features: tensors read by the driver
        (x, y), val = config["tensors"]["train"], config["tensors"].get("validation")
        train = tensor_batches(tuple(t.to(device) for t in x), y.to(device), s.batch_size, shuffle=s.shuffle, seed=s.seed)
        if val is None:
            return train, None
        val_batches = tensor_batches(tuple(t.to(device) for t in val[0]), val[1].to(device), s.batch_size, shuffle=False)
        return train, lambda: val_batches(0)
    suffix = f"_{rank}" if s.inputs == "features" and s.world_size > 0 else ""
    train_it = ray.train.get_dataset_shard(f"train{suffix}")
    val_it = ray.train.get_dataset_shard(f"validation{suffix}") if s.validation else None
    if s.inputs == "features" and s.in_memory:
        columns = ["row_id", "label", *s.feature_columns]
        x, y = _to_tensors(_gather(train_it, columns), s, device)
        train = tensor_batches(x, y, s.batch_size, shuffle=s.shuffle, seed=s.seed, rank=rank)
        if val_it is None:
            return train, None
        vx, vy = _to_tensors(_gather(val_it, columns), s, device)
        val_batches = tensor_batches(vx, vy, s.batch_size, shuffle=False)
        return train, lambda: val_batches(0)
    train = _streamed(train_it, s, device, rank, s.shuffle, pre)
    if val_it is None:
        return train, None
    val = _streamed(val_it, s, device, rank, False, pre)
    return train, lambda: val(0)


def _resume(s: TrainSettings, storage_options: dict | None) -> tuple[tuple | None, str | None, list[str]]:
    """The checkpoint a run continues from: Ray Train's (workers), or the newest good one
    in the run folder (local mode)."""
    import ray.train

    if s.world_size == 0:
        return RunFolder(s.storage, s.run, storage_options).resume_point()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None, None, []
    return resume_from_ray(checkpoint)


def train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train's training function: one loop for local mode, one worker or many."""
    import ray
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    s = TrainSettings.from_dict(config["settings"])
    storage_options = config.get("storage_options")
    callback: Callable[[dict[str, Any]], None] | None = config.get("callback")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(s.seed)
    model = config["model"][0]
    model = ray.get(model) if isinstance(model, ray.ObjectRef) else model
    ftc = FineTuneConfiguration.from_dict(s.fine_tune)
    specs = [LossSpec.from_dict(d) for d in s.losses]
    stopping = Stopping.from_dict(s.stopping)

    optimizer = ftc.build_optimizer(model)
    scheduler = ftc.build_scheduler(optimizer, stopping.limit)
    found, used, skipped = _resume(s, storage_options)
    state = None
    if found is not None:
        weights, state, opt_state, _ = found
        if skipped:
            log.warning("skipped bad checkpoints (%s); resuming from %s", "; ".join(skipped), used)
        if callback is not None:
            callback({"event": "resume", "rank": rank, "world_size": world, "checkpoint": used,
                      "epoch": state.epoch - 1, "skipped": skipped})
        model.load_state_dict(weights, strict=True)
        optimizer.load_state_dict(opt_state["optimizer"])
        scheduler.load_state_dict(opt_state["scheduler"])
    if s.world_size == 0:
        device = torch.device("cuda" if config.get("use_gpu") and torch.cuda.is_available() else "cpu")
        model = model.to(device)
    else:
        model = ray.train.torch.prepare_model(model)  # DDP for world > 1; moves to the worker's device
        device = ray.train.torch.get_device()
    inner = model.module if hasattr(model, "module") else model
    train, validation = _data(config, s, rank, device)
    run_folder = RunFolder(s.storage, s.run, storage_options) if s.world_size == 0 else None
    written: list[str] = []
    last_write = [time.monotonic()]

    def on_epoch(st: TrainState, metrics: dict[str, Any]) -> None:
        if run_folder is not None:  # Ray Train's local mode persists nothing: write it ourselves
            if st.finished(stopping) or time.monotonic() - last_write[0] >= LOCAL_CHECKPOINT_EVERY_S:
                written.append(run_folder.write(checkpoint_files(inner, optimizer, scheduler, st)))
                last_write[0] = time.monotonic()
        elif rank == 0:
            with tempfile.TemporaryDirectory() as d:
                write_folder(d, checkpoint_files(inner, optimizer, scheduler, st))
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)
        if run_folder is None:
            # A restart resumes from the checkpoints the controller has registered; one it
            # has not processed yet (it polls the workers) would be lost with a worker that
            # dies now. Waiting costs up to one poll per epoch.
            ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        if callback is not None:
            callback({"event": "epoch_end", "epoch": metrics["epoch"], "rank": rank, "world_size": world, "metrics": metrics})

    def on_batch(epoch: int, step: int, result: Any) -> None:
        callback({"event": "batch_end", "epoch": epoch, "step": step, "rank": rank, "world_size": world,  # type: ignore[misc]
                  "loss": result.loss})

    state = run_epochs(model, optimizer, scheduler, ftc, specs, train, validation=validation, stopping=stopping,
                       state=state, inner=inner, reduce=lambda v: _allreduce(v, device), on_epoch=on_epoch,
                       on_batch=on_batch if callback is not None else None)
    if s.world_size == 0:  # local mode: hand the state back to the driver directly
        return {"state": state, "weights": {k: v.detach().cpu() for k, v in inner.state_dict().items()},
                "checkpoint": written[-1] if written else used}
    return {}


# ---------------------------------------------------------------------------------------
# the driver side


def _open_features(features: str | FeatureSet, storage_options: dict | None) -> FeatureSet:
    return features if isinstance(features, FeatureSet) else FeatureSet.open(str(features), storage_options)


def _run_config(storage: str, name: str, storage_options: dict | None, max_failures: int) -> Any:
    import ray.train

    from .runtime import pyarrow_filesystem

    fs, path = pyarrow_filesystem(storage, storage_options)
    return ray.train.RunConfig(
        name=name,
        storage_path=path,
        storage_filesystem=fs,
        failure_config=ray.train.FailureConfig(max_failures=max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
    )


def default_storage() -> str:
    """Where runs go when no ``storage`` is given: Ray Train's default, ``~/ray_results``."""
    return os.path.expanduser("~/ray_results")


def run_name(name: str | None, kind: str) -> str:
    return name or f"{kind}-{datetime.now().strftime('%Y%m%d-%H%M%S-%f')}"


def seed_of(model: fx.GraphModule, seed: int | None) -> int:
    ftc = surgery.get_info(model).fine_tune
    return seed if seed is not None else (ftc.seed if ftc is not None and ftc.seed is not None else 0)


def run_trainer(trainable: fx.GraphModule, settings: TrainSettings, *, datasets: dict[str, Any] | None = None,
                dataset_config: Any = None, tensors: dict[str, Any] | None = None, use_gpu: bool = False,
                cpus_per_worker: float = 1.0, storage_options: dict | None = None, max_failures: int = 0,
                callback: Callable | None = None) -> Any:
    """Run :func:`train_loop` with a ``TorchTrainer`` (local mode when ``settings.world_size``
    is 0). Returns Ray Train's ``Result``."""
    import ray
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    local = settings.world_size == 0
    config: dict[str, Any] = {"settings": settings.to_dict(), "callback": callback}
    if local:  # in this process: train a copy, never the caller's model (the head shares its modules)
        config.update(model=[copy.deepcopy(trainable)], tensors=tensors, storage_options=storage_options, use_gpu=use_gpu)
        scaling = ScalingConfig(num_workers=0)
    else:
        config["model"] = [ray.put(trainable)]
        scaling = ScalingConfig(num_workers=settings.world_size, use_gpu=use_gpu,
                                resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})})
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=config,
        scaling_config=scaling,
        run_config=_run_config(settings.storage, settings.run, storage_options, max_failures) if not local else None,
        datasets=datasets,
        dataset_config=dataset_config,
    )
    return trainer.fit()


def finish(model: fx.GraphModule, result: Any, settings: TrainSettings, started: float) -> FitResult:
    """The :class:`FitResult` of a finished run: ``model`` with the trained module's best
    weights (the last ones when the run never improved)."""
    if settings.world_size == 0:
        out = result.return_value
        state, last, where = out["state"], out["weights"], out["checkpoint"]
    else:
        if result.checkpoint is None:
            raise RuntimeError(f"run {settings.run!r} ended without a checkpoint")
        with result.checkpoint.as_directory() as d:
            last, state, _, _ = read_folder(d)
        where = result.checkpoint.path
        fs = result.checkpoint.filesystem
        if fs is not None and getattr(fs, "type_name", "local") != "local" and "://" in settings.storage:
            where = f"{settings.storage.split('://', 1)[0]}://{where}"
    weights = state.best_weights if state.best_weights is not None else last
    trained = copy.deepcopy(model)
    own = trained.state_dict()
    unknown = [k for k in weights if k not in own]
    if unknown:
        raise RuntimeError(f"the checkpoint of run {settings.run!r} holds weights the model lacks: {unknown[:5]}")
    trained.load_state_dict(weights, strict=False)
    trained.eval()
    history = state.history
    rows = sum(h["rows"] for h in history)
    secs = sum(h["seconds"] for h in history)
    best = next((h for h in history if h["epoch"] == state.best_epoch), history[-1] if history else {})
    total = time.perf_counter() - started
    return FitResult(trained, history, where, settings.run, settings.storage, total, rows / secs if secs > 0 else None,
                     best, state.best_epoch, "local" if settings.world_size == 0 else "workers", settings.world_size,
                     max(0.0, total - secs))


def _feature_tensors(fset: FeatureSet, columns: tuple[str, ...]) -> dict[str, np.ndarray]:
    table = fset.read(["row_id", "label", *columns])
    return {name: (table.column(name).combine_chunks().to_numpy_ndarray() if name in columns
                   else table.column(name).to_numpy()) for name in ["row_id", "label", *columns]}


def fit_head(
    model: fx.GraphModule,
    features: str | FeatureSet,
    *,
    epochs: int | None = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
    use_gpu: bool = False,
    validation: str | FeatureSet | float | None = None,
    storage: str | None = None,
    name: str | None = None,
    storage_options: dict[str, Any] | None = None,
    shuffle: bool = True,
    seed: int | None = None,
    early_stopping_patience: int | None = None,
    max_epochs: int = DEFAULT_MAX_EPOCHS,
    max_failures: int = 0,
    cpus_per_worker: float = 1.0,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> FitResult:
    """Train the unfrozen part of ``model`` on a feature set (DL4J's ``fitFeaturized``, on
    a whole data set) with Ray Train, and return the model with the best epoch's weights.

    Args:
        model: a freezeray model whose frozen part made ``features``.
        features: a committed feature-set URI or :class:`FeatureSet`.
        epochs: epochs in total (a resumed run counts those already done); None (the
            default): until the validation loss has not improved for
            ``early_stopping_patience`` epochs (default 20), at most ``max_epochs``.
        batch_size: rows per worker per step; None: :func:`default_batch_size` of the
            training rows (16 for a thousand rows, up to 512 for large sets).
        num_workers: 0: Ray Train's local mode, in this process; N: N Ray Train workers
            (DDP); None (the default): local mode when the features fit comfortably in
            this process's memory and no GPU is asked for (see :func:`choose_workers`).
        use_gpu: train on GPUs (one per worker; the local GPU in local mode).
        validation: a feature-set URI / ``FeatureSet``, or a fraction of ``features`` held
            out by a seeded split on row ids; None with ``epochs=None``: a tenth is held out.
        storage: URI for checkpoints (local or object storage); None: ``~/ray_results``.
        name: run name under ``storage``; a run with an existing name resumes from its
            newest good checkpoint (in the mode it was started in).
        storage_options: fsspec options for ``features``, ``validation`` and ``storage``.
        shuffle: a fresh seeded permutation of the rows every epoch.
        seed: seeds torch and the permutations; None: the fine-tune configuration's seed, else 0.
        early_stopping_patience: epochs without a better validation loss (training loss
            without validation) that end the run; None: 20 with ``epochs=None``, off otherwise.
        max_epochs: the bound for ``epochs=None``.
        max_failures: worker failures to survive (each restarts from the last checkpoint).
        cpus_per_worker: CPUs Ray Train reserves per worker.
        callback: called in the training process with ``{"event": "batch_end" |
            "epoch_end" | "resume", ...}`` (``resume``: the checkpoint a restarted or resumed
            run continues from, and the bad checkpoints it skipped).

    Returns:
        a :class:`FitResult`: the full model with the best epoch's weights (by validation
        loss, else training loss), the per-epoch history and the checkpoint location.

    Raises:
        FeatureMismatch: features made by another frozen graph (before any training).
        ValueError: zero rows, labels the output cannot score, or a loss that does not fit
            class labels.

    Example:
        >>> result = pipeline.fit_head(model, "s3://bucket/features/train", storage_options=opts)
        >>> result.best_epoch, result.metrics["val_accuracy"]
    """
    started = time.perf_counter()
    fset = _open_features(features, storage_options)
    fset.check(model)
    if fset.rows == 0:
        raise ValueError(f"the feature set at {fset.uri!r} has zero rows: nothing to train on")
    specs = loss_specs(model)
    check_targets(specs, len(fset.classes) or None)
    head = split(model).unfrozen
    if not any(p.requires_grad for p in head.parameters()):
        raise ValueError("the model has nothing trainable after its frozen boundary")
    stopping = Stopping(epochs, early_stopping_patience, max_epochs)
    if validation is None and epochs is None:
        validation = AUTO_VALIDATION
        log.info("fit_head: epochs=None stops on the validation loss; holding out a seeded %.0f%% of the rows",
                 100 * AUTO_VALIDATION)
    val_set = None
    if isinstance(validation, float):
        if not 0.0 < validation < 1.0:
            raise ValueError(f"validation as a fraction must be in (0, 1), got {validation}")
    elif validation is not None:
        val_set = _open_features(validation, storage_options)
        val_set.check(model)
        if val_set.classes != fset.classes:
            raise ValueError(f"validation classes {val_set.classes} differ from training classes {fset.classes}")
    row_bytes = 4 * sum(math.prod(s) for s in fset.feature_shapes)
    workers = choose_workers(num_workers, use_gpu, row_bytes * (fset.rows + (val_set.rows if val_set else 0)),
                             cpus_per_worker)
    seed = seed_of(model, seed)
    train_rows = int(fset.rows * (1 - validation)) if isinstance(validation, float) else fset.rows
    batch = batch_size if batch_size is not None else default_batch_size(train_rows // max(workers, 1))
    settings = TrainSettings(
        stopping=stopping.to_dict(), batch_size=batch, shuffle=shuffle, seed=seed, inputs="features",
        feature_columns=fset.feature_columns, preprocessing=None, losses=tuple(s.to_dict() for s in specs),
        fine_tune=(surgery.get_info(model).fine_tune or FineTuneConfiguration()).to_dict(),
        validation=validation is not None, world_size=workers, run=run_name(name, "fit_head"),
        storage=storage or default_storage(), in_memory=row_bytes * fset.rows / max(workers, 1) <= WORKER_MEMORY_BYTES,
    )
    if workers == 0:
        result = run_trainer(head, settings, tensors=_local_tensors(fset, val_set, validation, settings),
                             use_gpu=use_gpu, storage_options=storage_options, callback=callback)
    else:
        result = _run_workers(head, fset, val_set, validation, settings, use_gpu, cpus_per_worker, storage_options,
                              max_failures, callback)
    out = finish(model, result, settings, started)
    log.info("fit_head %s (%s): %d epochs, best epoch %s: %s", out.run,
             "local mode" if workers == 0 else f"{workers} workers", len(out.history), out.best_epoch, _fmt(out.metrics))
    return out


def _local_tensors(fset: FeatureSet, val_set: FeatureSet | None, validation: Any, s: TrainSettings) -> dict[str, Any]:
    """Training (and validation) features read into memory, split like the workers split them."""
    cpu = torch.device("cpu")
    table = _feature_tensors(fset, s.feature_columns)
    tensors: dict[str, Any] = {}
    if isinstance(validation, float):
        tensors["train"] = _to_tensors(split_rows(table, validation, s.seed, "train"), s, cpu)
        tensors["validation"] = _to_tensors(split_rows(table, validation, s.seed, "validation"), s, cpu)
    else:
        tensors["train"] = _to_tensors(table, s, cpu)
        if val_set is not None:
            tensors["validation"] = _to_tensors(_feature_tensors(val_set, s.feature_columns), s, cpu)
    return tensors


def _run_workers(head: fx.GraphModule, fset: FeatureSet, val_set: FeatureSet | None, validation: Any,
                 s: TrainSettings, use_gpu: bool, cpus_per_worker: float, storage_options: dict | None,
                 max_failures: int, callback: Callable | None) -> Any:
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
                       use_gpu=use_gpu, cpus_per_worker=cpus_per_worker, storage_options=storage_options,
                       max_failures=max_failures, callback=callback)


def _split_for_workers(ds: Any, prefix: str, n: int, equal: bool) -> dict[str, Any]:
    """Materialize ``ds`` in block order and split it into one dataset per worker, on the
    driver, before Train reserves the workers' CPUs."""
    ds.context.execution_options.preserve_order = True
    parts = ds.materialize().split(n, equal=equal)
    for p in parts:  # epochs re-read these many times: no progress bar per pass
        p.context.enable_progress_bars = False
    return {f"{prefix}_{i}": p for i, p in enumerate(parts)}


def _fmt(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
