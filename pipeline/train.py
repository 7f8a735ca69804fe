"""Ray Train: fit the trainable part of a model on feature shards (``fit_head``) or the
whole model on images (``finetune``), with one training loop for one worker or many.

Both build the optimizer, schedule, penalties and losses from the model's
``FineTuneConfiguration`` and output layers (see :mod:`surgery.finetune` and
:mod:`surgery.objective`), so a head trained here is the one the helper would train.

Data: ``fit_head`` materializes the feature set in the object store and splits it on the
driver into one equal part per worker (``Dataset.split(equal=True)``: up to
``num_workers - 1`` rows are left out of each epoch, as with ``DistributedSampler(drop_last=True)``),
so the split costs no CPU while Train holds the workers' CPUs, and the same seed, data and
worker count give the same weights. Each worker shuffles its part every epoch with a local
shuffle buffer seeded by (seed, epoch). ``finetune`` streams decoded images with
``streaming_split``; leave Ray Data a CPU for decoding.

Checkpoints (weights as safetensors, optimizer and schedule state as weights-only torch
files, metrics history as JSON) go to ``storage/name``; a run started again with the same
name resumes from its latest checkpoint, and ``max_failures`` lets a run survive workers
that die. ``meta.json`` is written last and holds the size and SHA-256 of the other two
files: a checkpoint that is partial (a file missing) or corrupt (a file changed) is
detected when the run resumes, and the newest good checkpoint before it is used instead
(two are kept).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
import torch.fx as fx

import surgery
from surgery.finetune import FineTuneConfiguration
from surgery.helper import split
from surgery.layers import emit_logits
from surgery.objective import LossSpec, check_targets, loss_specs, objective
from surgery.preprocess import PreprocessConfig, normalize

from .features import FeatureSet
from .sources import ImageSource, decode_dataset, read_images, readable

__all__ = ["fit_head", "finetune", "FitResult", "TrainSettings", "split_rows", "CheckpointError"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSettings:
    """What every worker needs besides the model (crosses the Ray boundary as a dict)."""

    epochs: int  # epochs to run in total (a resumed run counts those already done)
    batch_size: int  # rows per worker per step
    shuffle: bool  # shuffle each worker's rows every epoch
    shuffle_buffer: int  # rows in each worker's local shuffle buffer
    seed: int  # seeds torch and the shuffles
    patience: int | None  # stop after this many epochs without a better validation loss
    inputs: Literal["features", "pixels"]  # what a batch holds
    feature_columns: tuple[str, ...]  # feature columns, in the head's argument order
    preprocessing: dict[str, Any] | None  # for pixels: normalisation
    losses: tuple[dict[str, Any], ...]  # LossSpec dicts, in output order
    fine_tune: dict[str, Any]  # FineTuneConfiguration dict
    validation: bool  # whether validation splits exist
    world_size: int  # workers

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs <= 0:
            raise ValueError(f"epochs must be a positive integer, got {self.epochs!r}")
        if not isinstance(self.batch_size, int) or self.batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.patience is not None and (not isinstance(self.patience, int) or self.patience <= 0):
            raise ValueError(f"early_stopping_patience must be a positive integer or None, got {self.patience!r}")

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

    model: fx.GraphModule  # the full model with the trained weights, ready for surgery.save
    history: list[dict[str, Any]]  # per-epoch metrics: loss, accuracy, val_loss, val_accuracy, lr, rows, seconds
    checkpoint: str | None  # URI of the latest checkpoint
    run: str  # run name (same name -> resume)
    storage: str  # where the run's checkpoints live
    seconds: float  # wall time of the whole call, Ray Train start-up included
    rows_per_s: float | None = None  # training rows per second over the epochs this call ran
    metrics: dict[str, Any] = field(default_factory=dict)  # the last epoch's metrics


# ---------------------------------------------------------------------------------------
# the worker loop


def _inputs(batch: dict[str, torch.Tensor], s: TrainSettings, device: torch.device,
            config: PreprocessConfig | None) -> tuple[torch.Tensor, ...]:
    if s.inputs == "features":
        return tuple(batch[c].to(device=device, dtype=torch.float32) for c in s.feature_columns)
    return (normalize(batch["pixels"].to(device), config),)


def _allreduce(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t.tolist()


def _score(model: torch.nn.Module, specs: Sequence[LossSpec], inputs: tuple, y: torch.Tensor) -> tuple[torch.Tensor, int]:
    with emit_logits(model):
        out = model(*inputs)
    loss = objective(specs, out, y)
    first = out[0] if isinstance(out, tuple) else out
    correct = int((first.argmax(1) == y).sum()) if first.dim() == 2 and y.dim() == 1 else 0
    return loss, correct


class CheckpointError(RuntimeError):
    """A checkpoint that is partial or corrupt."""


_CHECKPOINT_FILES = ("model.safetensors", "state.pt")


def _digest(path: str) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"bytes": os.path.getsize(path), "sha256": h.hexdigest()}


def _save_checkpoint(directory: str, model: torch.nn.Module, optimizer: Any, scheduler: Any, meta: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, os.path.join(directory, "model.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, os.path.join(directory, "state.pt"))
    files = {name: _digest(os.path.join(directory, name)) for name in _CHECKPOINT_FILES}
    with open(os.path.join(directory, "meta.json"), "w") as f:  # last: its presence means the others are complete
        json.dump({**meta, "files": files}, f)


def _load_checkpoint(directory: str) -> tuple[dict, dict, dict]:
    """Weights, optimizer/schedule state and meta of the checkpoint in ``directory``, after
    checking every file against the sizes and digests in its ``meta.json``.

    Raises:
        CheckpointError: a file is missing, changed, or does not parse.
    """
    from safetensors.torch import load_file

    try:
        with open(os.path.join(directory, "meta.json")) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise CheckpointError("meta.json is missing (a partial checkpoint)") from None
    except ValueError as exc:
        raise CheckpointError(f"meta.json does not parse: {exc}") from None
    files = meta.get("files")
    if not isinstance(files, dict):
        raise CheckpointError("meta.json lists no file digests")
    for name in _CHECKPOINT_FILES:
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            raise CheckpointError(f"{name} is missing (a partial checkpoint)")
        if _digest(path) != files.get(name):
            raise CheckpointError(f"{name} does not match its digest in meta.json (corrupt or changed)")
    try:
        weights = load_file(os.path.join(directory, "model.safetensors"))
        state = torch.load(os.path.join(directory, "state.pt"), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot load: {type(exc).__name__}: {exc}") from None
    return weights, state, meta


def _resume_point(checkpoint: Any) -> tuple[dict, dict, dict, str, list[str]]:
    """Load ``checkpoint`` (Ray Train's latest) or, if it is partial or corrupt, the newest
    good checkpoint of the same run before it. Returns weights, state, meta, the path used
    and the problems of those skipped.

    Raises:
        CheckpointError: no good checkpoint is left.
    """
    import ray.train
    from pyarrow.fs import FileSelector, FileType

    problems: list[str] = []
    try:
        with checkpoint.as_directory() as d:
            return (*_load_checkpoint(d), checkpoint.path, problems)
    except CheckpointError as exc:
        problems.append(f"{checkpoint.path}: {exc}")
    fs, latest = checkpoint.filesystem, checkpoint.path.rstrip("/")
    run_dir, name = latest.rsplit("/", 1)
    older = sorted((i.path for i in fs.get_file_info(FileSelector(run_dir))
                    if i.type == FileType.Directory and i.base_name.startswith("checkpoint_") and i.base_name < name),
                   reverse=True)
    for path in older:
        try:
            with ray.train.Checkpoint(path, filesystem=fs).as_directory() as d:
                return (*_load_checkpoint(d), path, problems)
        except CheckpointError as exc:
            problems.append(f"{path}: {exc}")
    raise CheckpointError("no usable checkpoint to resume from: " + "; ".join(problems))


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function (one loop for one worker or many)."""
    import ray
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    s = TrainSettings.from_dict(config["settings"])
    callback: Callable[[dict[str, Any]], None] | None = config.get("callback")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(s.seed)
    model = config["model"][0]
    model = ray.get(model) if isinstance(model, ray.ObjectRef) else model
    ftc = FineTuneConfiguration.from_dict(s.fine_tune)
    specs = [LossSpec.from_dict(d) for d in s.losses]
    pre = PreprocessConfig.from_dict(s.preprocessing) if s.preprocessing else None

    optimizer = ftc.build_optimizer(model)
    scheduler = ftc.build_scheduler(optimizer, s.epochs)
    start_epoch, history, best, waited = 0, [], float("inf"), 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        weights, state, meta, used, skipped = _resume_point(checkpoint)
        if skipped:
            log.warning("skipped bad checkpoints (%s); resuming from %s", "; ".join(skipped), used)
        if callback is not None:
            callback({"event": "resume", "rank": rank, "world_size": world, "checkpoint": used, "epoch": meta["epoch"],
                      "skipped": skipped})
        model.load_state_dict(weights, strict=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history, best, waited = meta["epoch"] + 1, meta["history"], meta["best"], meta["waited"]
        if meta.get("stopped"):
            start_epoch = s.epochs  # early stopping had ended this run: nothing left to do
    model = ray.train.torch.prepare_model(model)  # DDP for world > 1; moves to the worker's device
    device = ray.train.torch.get_device()
    inner = model.module if hasattr(model, "module") else model
    train_it = ray.train.get_dataset_shard(f"train_{rank}" if s.inputs == "features" else "train")
    val_it = None
    if s.validation:
        val_it = ray.train.get_dataset_shard(f"validation_{rank}" if s.inputs == "features" else "validation")

    for epoch in range(start_epoch, s.epochs):
        t0 = time.perf_counter()
        model.train()
        loss_sum, correct, rows = 0.0, 0, 0
        batches = train_it.iter_torch_batches(
            batch_size=s.batch_size,
            local_shuffle_buffer_size=s.shuffle_buffer if s.shuffle else None,
            local_shuffle_seed=(s.seed * 100_003 + epoch * 101 + rank) if s.shuffle else None,
        )
        for step, batch in enumerate(batches):
            inputs = _inputs(batch, s, device, pre)
            y = batch["label"].to(device).long()
            loss, ok = _score(model, specs, inputs, y)
            penalty = ftc.penalty(inner)
            total = loss + penalty if penalty is not None else loss
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            ftc.clip_gradients_(inner)
            optimizer.step()
            n = int(y.shape[0])
            loss_sum, correct, rows = loss_sum + float(loss.detach()) * n, correct + ok, rows + n
            if callback is not None:
                callback({"event": "batch_end", "epoch": epoch, "step": step, "rank": rank, "world_size": world,
                          "loss": float(loss.detach())})
        lr = float(optimizer.param_groups[0]["lr"])
        scheduler.step()
        loss_sum, correct, rows = _allreduce([loss_sum, correct, rows], device)
        metrics: dict[str, Any] = {"epoch": epoch, "loss": loss_sum / max(rows, 1), "accuracy": correct / max(rows, 1),
                                   "lr": lr, "rows": int(rows)}
        if val_it is not None:
            model.eval()
            v_loss, v_ok, v_rows = 0.0, 0, 0
            with torch.no_grad():
                for batch in val_it.iter_torch_batches(batch_size=s.batch_size):
                    y = batch["label"].to(device).long()
                    loss, ok = _score(model, specs, _inputs(batch, s, device, pre), y)
                    v_loss, v_ok, v_rows = v_loss + float(loss) * len(y), v_ok + ok, v_rows + len(y)
            v_loss, v_ok, v_rows = _allreduce([v_loss, v_ok, v_rows], device)
            metrics.update(val_loss=v_loss / max(v_rows, 1), val_accuracy=v_ok / max(v_rows, 1), val_rows=int(v_rows))
        metrics["seconds"] = time.perf_counter() - t0
        monitored = metrics.get("val_loss", metrics["loss"])
        if monitored < best - 1e-12:
            best, waited = monitored, 0
        else:
            waited += 1
        stop = s.patience is not None and waited >= s.patience
        metrics["stopped_early"] = bool(stop)
        history.append(metrics)
        meta = {"epoch": epoch, "history": history, "best": best, "waited": waited, "stopped": stop}
        if rank == 0:
            with tempfile.TemporaryDirectory() as d:
                _save_checkpoint(d, inner, optimizer, scheduler, meta)
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)
        # A restart resumes from the checkpoints the controller has registered; one it has
        # not processed yet (it polls the workers) would be lost with a worker that dies
        # now. Waiting costs up to one poll per epoch.
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        if callback is not None:
            callback({"event": "epoch_end", "epoch": epoch, "rank": rank, "world_size": world, "metrics": metrics})
        if stop:
            break


# ---------------------------------------------------------------------------------------
# the driver side


def split_rows(batch: dict[str, np.ndarray], fraction: float, seed: int, keep: Literal["train", "validation"]) -> dict[str, np.ndarray]:
    """Ray Data batch filter for a seeded train/validation split by row id (the same row
    always lands on the same side, whatever the batching)."""
    ids = np.asarray(batch["row_id"]).astype(np.uint64)
    with np.errstate(over="ignore"):
        h = ids * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed) * np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(31)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(29)
    u = (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    mask = (u < fraction) if keep == "validation" else (u >= fraction)
    return {k: np.asarray(v)[mask] for k, v in batch.items()}


def _open_features(features: str | FeatureSet, storage_options: dict | None) -> FeatureSet:
    return features if isinstance(features, FeatureSet) else FeatureSet.open(str(features), storage_options)


def _run_config(storage: str | None, name: str, storage_options: dict | None, max_failures: int) -> Any:
    import ray.train

    from .runtime import pyarrow_filesystem

    fs, path = (None, None)
    if storage is not None:
        fs, path = pyarrow_filesystem(storage, storage_options)
    return ray.train.RunConfig(
        name=name,
        storage_path=path,
        storage_filesystem=fs,
        failure_config=ray.train.FailureConfig(max_failures=max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
    )


def _settings_common(model: fx.GraphModule, epochs: int, batch_size: int, shuffle: bool, seed: int | None,
                     patience: int | None, num_workers: int) -> dict[str, Any]:
    info = surgery.get_info(model)
    ftc = info.fine_tune or FineTuneConfiguration()
    if not isinstance(num_workers, int) or num_workers <= 0:
        raise ValueError(f"num_workers must be a positive integer, got {num_workers!r}")
    return {
        "epochs": epochs, "batch_size": batch_size, "shuffle": shuffle, "shuffle_buffer": 10_000,
        "seed": seed if seed is not None else (ftc.seed if ftc.seed is not None else 0),
        "patience": patience, "fine_tune": ftc.to_dict(), "world_size": num_workers,
    }


def _run(trainable: fx.GraphModule, settings: TrainSettings, datasets: dict[str, Any], dataset_config: Any,
         num_workers: int, use_gpu: bool, cpus_per_worker: float, storage: str | None, name: str | None,
         storage_options: dict | None, max_failures: int, callback: Callable | None, kind: str) -> tuple[Any, str]:
    import ray
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    run = name or f"{kind}-{datetime.now().strftime('%Y%m%d-%H%M%S-%f')}"
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"settings": settings.to_dict(), "model": [ray.put(trainable)], "callback": callback},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}),
        run_config=_run_config(storage, run, storage_options, max_failures),
        datasets=datasets,
        dataset_config=dataset_config,
    )
    return trainer.fit(), run


def _finish(model: fx.GraphModule, result: Any, run: str, storage: str | None, started: float) -> FitResult:
    if result.checkpoint is None:
        raise RuntimeError(f"run {run!r} ended without a checkpoint")
    with result.checkpoint.as_directory() as d:
        weights, _, meta = _load_checkpoint(d)
    trained = copy.deepcopy(model)
    own = trained.state_dict()
    unknown = [k for k in weights if k not in own]
    if unknown:
        raise RuntimeError(f"the checkpoint of run {run!r} holds weights the model lacks: {unknown[:5]}")
    trained.load_state_dict(weights, strict=False)
    trained.eval()
    history = meta["history"]
    rows = sum(h["rows"] for h in history)
    secs = sum(h["seconds"] for h in history)
    where = result.checkpoint.path
    fs = result.checkpoint.filesystem
    if fs is not None and getattr(fs, "type_name", "local") != "local":
        where = f"{storage.split('://', 1)[0]}://{where}" if storage and "://" in storage else where
    return FitResult(trained, history, where, run, storage or "~/ray_results", time.perf_counter() - started,
                     rows / secs if secs > 0 else None, history[-1] if history else {})


def fit_head(
    model: fx.GraphModule,
    features: str | FeatureSet,
    *,
    epochs: int = 10,
    batch_size: int = 256,
    num_workers: int = 2,
    use_gpu: bool = False,
    validation: str | FeatureSet | float | None = None,
    storage: str | None = None,
    name: str | None = None,
    storage_options: dict[str, Any] | None = None,
    shuffle: bool = True,
    seed: int | None = None,
    early_stopping_patience: int | None = None,
    max_failures: int = 0,
    cpus_per_worker: float = 1.0,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> FitResult:
    """Train the unfrozen part of ``model`` on a feature set with Ray Train (DL4J's
    ``fitFeaturized``, distributed).

    Args:
        model: a freezeray model whose frozen part made ``features``.
        features: a committed feature-set URI or :class:`FeatureSet`.
        epochs: epochs in total (a resumed run counts those already done).
        batch_size: rows per worker per step.
        num_workers: Ray Train workers (DDP).
        use_gpu: one GPU per worker.
        validation: a feature-set URI / ``FeatureSet``, or a fraction of ``features`` held
            out by a seeded split on row ids.
        storage: URI for checkpoints (local or object storage); None: Ray's default.
        name: run name under ``storage``; a run with an existing name resumes.
        storage_options: fsspec options for ``features``, ``validation`` and ``storage``.
        shuffle: shuffle each worker's rows every epoch.
        seed: seeds torch and shuffles; None: the fine-tune configuration's seed, else 0.
        early_stopping_patience: stop after this many epochs without a better validation
            loss (training loss without validation).
        max_failures: worker failures to survive (each restarts from the last checkpoint).
        cpus_per_worker: CPUs Ray Train reserves per worker.
        callback: called inside workers with ``{"event": "batch_end" | "epoch_end" | "resume", ...}``
            (``resume``: the checkpoint a restarted or resumed run continues from, and
            the bad checkpoints it skipped).

    Returns:
        a :class:`FitResult` with the full trained model, the per-epoch history and the
        checkpoint location.

    Raises:
        FeatureMismatch: features made by another frozen graph (before any training).
        ValueError: zero rows, labels the output cannot score, or a loss that does not fit
            class labels.
    """
    import ray.train

    from .runtime import ensure_ray

    started = time.perf_counter()
    fset = _open_features(features, storage_options)
    fset.check(model)
    if fset.rows == 0:
        raise ValueError(f"the feature set at {fset.uri!r} has zero rows: nothing to train on")
    specs = loss_specs(model)
    check_targets(specs, len(fset.classes) or None)
    parts = split(model)
    head = parts.unfrozen
    if not any(p.requires_grad for p in head.parameters()):
        raise ValueError("the model has nothing trainable after its frozen boundary")
    settings_kw = _settings_common(model, epochs, batch_size, shuffle, seed, early_stopping_patience, num_workers)
    val_set = None
    if validation is not None and not isinstance(validation, float):
        val_set = _open_features(validation, storage_options)
        val_set.check(model)
        if val_set.classes != fset.classes:
            raise ValueError(f"validation classes {val_set.classes} differ from training classes {fset.classes}")
    elif isinstance(validation, float) and not 0.0 < validation < 1.0:
        raise ValueError(f"validation as a fraction must be in (0, 1), got {validation}")
    settings = TrainSettings(inputs="features", feature_columns=fset.feature_columns, preprocessing=None,
                             losses=tuple(s.to_dict() for s in specs), validation=validation is not None, **settings_kw)
    ensure_ray()
    columns = ["row_id", "label", *fset.feature_columns]
    train_ds = fset.to_dataset().select_columns(columns)
    val_ds = val_set.to_dataset().select_columns(columns) if val_set is not None else None
    if isinstance(validation, float):
        kw = {"fraction": validation, "seed": settings.seed}
        val_ds = train_ds.map_batches(split_rows, fn_kwargs={**kw, "keep": "validation"}, batch_format="numpy")
        train_ds = train_ds.map_batches(split_rows, fn_kwargs={**kw, "keep": "train"}, batch_format="numpy")
    datasets = _split_for_workers(train_ds, "train", num_workers, equal=True)
    if val_ds is not None:
        datasets.update(_split_for_workers(val_ds, "validation", num_workers, equal=False))
    result, run = _run(head, settings, datasets, ray.train.DataConfig(datasets_to_split=[]), num_workers, use_gpu,
                       cpus_per_worker, storage, name, storage_options, max_failures, callback, "fit_head")
    out = _finish(model, result, run, storage, started)
    log.info("fit_head %s: %d epochs, last %s", run, len(out.history), _fmt(out.metrics))
    return out


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


def _drop_errors(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    ok = readable(batch["error"])
    return {k: np.asarray(v)[ok] for k, v in batch.items() if k not in ("error", "path", "shard")}


def image_dataset(src: ImageSource, config: PreprocessConfig, augment: bool, seed: int, decode_batch_size: int = 32) -> Any:
    """Decoded, preprocessed images of ``src`` as a Ray Dataset (row_id, label, pixels);
    unreadable files are left out (``evaluate``/``predict`` report them)."""
    ds = decode_dataset(src.table, config, src.storage_options, decode_batch_size, augment=augment, seed=seed)
    return ds.map_batches(_drop_errors, batch_format="numpy")


def finetune(
    model: fx.GraphModule,
    source: str | ImageSource,
    *,
    epochs: int = 5,
    batch_size: int = 32,
    num_workers: int = 1,
    use_gpu: bool = False,
    validation: str | ImageSource | None = None,
    augment: bool = True,
    image_size: int | None = None,
    storage: str | None = None,
    name: str | None = None,
    storage_options: dict[str, Any] | None = None,
    shuffle: bool = True,
    seed: int | None = None,
    early_stopping_patience: int | None = None,
    max_failures: int = 0,
    cpus_per_worker: float = 1.0,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> FitResult:
    """Train the whole model from raw images (DL4J's "fine-tune from block four"): every
    unfrozen layer trains, frozen layers stay frozen. Decoding, preprocessing and the
    standard training augmentation (random resized crop, flip) run in Ray Data.

    Arguments are as for :func:`fit_head`; ``source``/``validation`` are image folders,
    manifests or :class:`ImageSource`s, and ``image_size`` overrides the input size.
    """
    import ray.train

    from .featurize import resolve_preprocessing
    from .runtime import ensure_ray

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
    config = resolve_preprocessing(model, None, image_size)
    settings_kw = _settings_common(model, epochs, batch_size, shuffle, seed, early_stopping_patience, num_workers)
    settings = TrainSettings(inputs="pixels", feature_columns=(), preprocessing=config.to_dict(),
                             losses=tuple(s.to_dict() for s in specs), validation=validation is not None, **settings_kw)
    ensure_ray()
    datasets = {"train": image_dataset(src, config, augment, settings.seed)}
    if validation is not None:
        val_src = validation if isinstance(validation, ImageSource) else read_images(validation, storage_options, classes=src.classes)
        datasets["validation"] = image_dataset(val_src, config, False, settings.seed)
    result, run = _run(model, settings, datasets, ray.train.DataConfig(datasets_to_split="all"), num_workers, use_gpu,
                       cpus_per_worker, storage, name, storage_options, max_failures, callback, "finetune")
    out = _finish(model, result, run, storage, started)
    log.info("finetune %s: %d epochs, last %s", run, len(out.history), _fmt(out.metrics))
    return out
