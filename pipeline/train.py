"""Ray Train: the training function ``fit_head`` and ``finetune`` share, run by a
``TorchTrainer`` in Ray Train's local mode (the calling process) or on workers.

The epoch loop itself is :func:`surgery.training.run_epochs` (Ray-free); this module gives
it batches (tensors held in memory, or a Ray Data stream), checkpoints (Ray Train's on
workers; freezeray's own in local mode, which persists nothing, see
:mod:`pipeline.checkpoints`) and resume, and turns the outcome into a :class:`FitResult`
whose model holds the **best** epoch's weights.

Each epoch shuffles with a permutation seeded by (seed, epoch, rank), so a run and its
resumed continuation see the same order, and one worker gives what local mode gives.
"""

from __future__ import annotations

import copy
import logging
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
from freezeray.images import PreprocessConfig
from surgery.training import (
    Stopping,
    TrainState,
    precision,
    run_epochs,
    tensor_batches,
)
from surgery.training.config import FineTuneConfiguration
from surgery.training.objective import LossSpec

from .checkpoints import (
    CheckpointError,
    RunFolder,
    checkpoint_files,
    read_folder,
    resume_from_ray,
    write_folder,
)
from .decode import normalize
from .resources import Resources
from .stream import LastBatch

__all__ = ["FitResult", "TrainSettings", "train_loop", "run_trainer", "finish", "training_resources", "run_name",
           "seed_of", "default_storage", "WORKER_MEMORY_BYTES", "LOCAL_CHECKPOINT_EVERY_S", "CheckpointError",
           "worker_memory_bytes"]

log = logging.getLogger(__name__)

WORKER_MEMORY_BYTES = 4 << 30  # a worker holds its part of the features in memory up to this size (see worker_memory_bytes)
LOCAL_CHECKPOINT_EVERY_S = 5.0  # local mode checkpoints at most this often, and after the last epoch


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
    augment: tuple[Any, ...] | None = None  # pixels: transforms.v2 (objects or names) applied per epoch; None: off
    stream: dict[str, Any] | None = None  # features streamed by each worker from the shards (pipeline.stream.StreamPlan)

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
        if d.get("augment") is not None:
            d["augment"] = tuple(d["augment"])
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
    stages: list["FitResult"] = field(default_factory=list)  # a staged finetune: each stage's own result
    resumed: bool = False  # the run existed with this definition: it continued (or, finished, returned as it was)


def worker_memory_bytes() -> int:
    """The most feature bytes (as float32) a Ray Train worker reads into memory; past it each
    worker streams its shards (:mod:`pipeline.stream`). Override: ``FREEZERAY_WORKER_MEMORY_BYTES``."""
    override = os.environ.get("FREEZERAY_WORKER_MEMORY_BYTES")
    return int(float(override)) if override else WORKER_MEMORY_BYTES


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
              config: PreprocessConfig | None, augment: bool = False) -> Callable[[int], Any]:
    augmentation = None
    if augment and s.augment is not None and config is not None:
        from surgery.training.augment import Augmentation

        augmentation = Augmentation(s.augment, config.input_size[1:])

    def epoch_batches(epoch: int) -> Any:
        for batch in it.iter_torch_batches(batch_size=s.batch_size,
                                           local_shuffle_buffer_size=s.shuffle_buffer if shuffle else None,
                                           local_shuffle_seed=(s.seed * 1_000_003 + epoch * 101 + rank) if shuffle else None):
            if s.inputs == "features":
                x = tuple(batch[c].to(device=device, dtype=torch.float32) for c in s.feature_columns)
            elif augmentation is not None:  # fresh crops and flips each epoch, seeded by (seed, epoch, row)
                pixels = augmentation(batch["pixels"], batch["row_id"].tolist(), seed=s.seed, epoch=epoch)
                x = (normalize(pixels.permute(0, 2, 3, 1).to(device), config),)  # (B, C, H, W) -> (B, H, W, C) uint8
            else:
                x = (normalize(batch["pixels"].to(device), config),)
            yield x, batch["label"].to(device).long()

    return epoch_batches


def _data(config: dict[str, Any], s: TrainSettings, rank: int, device: torch.device) -> tuple[Callable, Callable | None]:
    """``epoch -> batches`` for training and ``() -> batches`` for validation."""
    import ray.train

    pre = PreprocessConfig.from_dict(s.preprocessing) if s.preprocessing else None
    if s.stream is not None:  # each worker reads its own shards from storage
        from .stream import StreamPlan, stream_batches, validation_batches

        plan = StreamPlan.from_dict(s.stream)
        last = config.setdefault("_last_batch", LastBatch())
        return ((lambda epoch, start=0: stream_batches(plan, epoch, rank, start, device, last)),
                (lambda: validation_batches(plan, rank, device)) if plan.validation else None)
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
    train = _streamed(train_it, s, device, rank, s.shuffle, pre, augment=True)
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
                      "epoch": state.epoch - 1, "step": state.step, "skipped": skipped})
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
    autocast, scaler = precision(ftc.mixed_precision, device)
    if ftc.mixed_precision and autocast is None:
        log.warning("mixed_precision=%r: not available on %s (fp16 needs CUDA, bf16 a GPU or a CPU with native bf16); "
                    "training in float32", ftc.mixed_precision, device)
    if state is not None and state.step and rank != 0:  # rank 0's copy of the sums so far counts every worker's
        state.partial = None
    train, validation = _data(config, s, rank, device)
    run_folder = RunFolder(s.storage, s.run, storage_options) if s.world_size == 0 else None
    written: list[str] = []
    last_write = [time.monotonic()]
    streamed = config.get("_last_batch")

    def report(st: TrainState, metrics: dict[str, Any]) -> None:  # on workers: rank 0 with the checkpoint
        if rank == 0:
            with tempfile.TemporaryDirectory() as d:
                write_folder(d, checkpoint_files(inner, optimizer, scheduler, st))
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)

    def on_checkpoint(st: TrainState) -> None:  # mid-epoch, streaming on workers: every worker is at this step
        report(st, {"epoch": st.epoch, "step": st.step, "partial": True})
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        if callback is not None:
            callback({"event": "checkpoint", "epoch": st.epoch, "step": st.step, "rank": rank, "world_size": world})

    def on_epoch(st: TrainState, metrics: dict[str, Any]) -> None:
        if run_folder is not None:  # Ray Train's local mode persists nothing: write it ourselves
            if st.finished(stopping) or time.monotonic() - last_write[0] >= LOCAL_CHECKPOINT_EVERY_S:
                written.append(run_folder.write(checkpoint_files(inner, optimizer, scheduler, st)))
                last_write[0] = time.monotonic()
        else:
            report(st, metrics)
        if run_folder is None:
            # A restart resumes from the checkpoints the controller has registered; one it
            # has not processed yet (it polls the workers) would be lost with a worker that
            # dies now. Waiting costs up to one poll per epoch.
            ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        if callback is not None:
            callback({"event": "epoch_end", "epoch": metrics["epoch"], "rank": rank, "world_size": world, "metrics": metrics})

    def on_batch(epoch: int, step: int, result: Any) -> None:
        event = {"event": "batch_end", "epoch": epoch, "step": step, "rank": rank, "world_size": world, "loss": result.loss}
        if streamed is not None:
            event["row_ids"] = list(streamed.ids)
        callback(event)  # type: ignore[misc]

    every = int(s.stream["checkpoint_steps"]) if s.stream is not None and s.world_size > 0 else 0
    state = run_epochs(model, optimizer, scheduler, ftc, specs, train, validation=validation, stopping=stopping,
                       state=state, inner=inner, reduce=lambda v: _allreduce(v, device), on_epoch=on_epoch,
                       on_batch=on_batch if callback is not None else None, autocast=autocast, scaler=scaler,
                       checkpoint_every=every, on_checkpoint=on_checkpoint)
    if s.world_size == 0:  # local mode: hand the state back to the driver directly
        return {"state": state, "weights": {k: v.detach().cpu() for k, v in inner.state_dict().items()},
                "checkpoint": written[-1] if written else used}
    return {}


# ---------------------------------------------------------------------------------------
# the driver side


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


def training_resources(num_workers: int | None, use_gpu: bool, resources: Resources | None) -> tuple[int | None, bool, float]:
    """``(num_workers, use_gpu, cpus_per_worker)`` from the shorthand arguments and
    ``resources``; giving the same setting twice, differently, is an error."""
    r = resources if resources is not None else Resources()
    if num_workers is not None and r.num_workers is not None and num_workers != r.num_workers:
        raise ValueError(f"num_workers={num_workers} and resources.num_workers={r.num_workers} disagree; give one")
    return (num_workers if num_workers is not None else r.num_workers, bool(use_gpu or r.use_gpu),
            float(r.cpus_per_worker or 1.0))


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
        if callback is not None:
            try:
                ray.cloudpickle.dumps(callback)
            except Exception as exc:
                raise ValueError(f"callback runs in Ray Train workers, so it must be picklable; this one is not "
                                 f"({type(exc).__name__}: {exc}). Use num_workers=0 (local mode) or a picklable "
                                 "callable") from None
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


def _fmt(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
