"""The training loop, without Ray: one optimizer step, one epoch, and the epoch loop with
early stopping and best-weight tracking.

Every trainer in freezeray runs these functions: ``TransferLearningHelper.fit_featurized``
(one step), ``pipeline.fit_head`` in Ray Train's local mode and on Ray Train workers, the
trials of ``pipeline.sweep`` and ``pipeline.finetune``. Ray only supplies the batches, the
reduction of metrics across workers and somewhere to put checkpoints (the ``on_epoch``
hook), so early stopping, resume and metrics are testable here in milliseconds.

Stopping rules (:class:`Stopping`):

* ``epochs=N``: exactly N epochs in total (a resumed run counts those already done),
  unless ``patience`` is given too, which may end the run earlier;
* ``epochs=None``: until the monitored loss has not improved for ``patience`` epochs
  (default :data:`DEFAULT_PATIENCE`), at most ``max_epochs`` (default
  :data:`DEFAULT_MAX_EPOCHS`).

The monitored loss is the validation loss when there is validation data, else the
training loss. A model with several outputs is trained on the weighted sum of their
losses (:mod:`surgery.training.objective`); each epoch's metrics then also hold every output's own
``<vertex>_loss`` and ``<vertex>_accuracy`` (and ``val_<vertex>_...``), while ``loss`` is
the sum and ``accuracy`` is the first output's. :class:`TrainState` keeps the best epoch's weights (of the trained module,
so parameters and buffers such as BatchNorm statistics), which trainers return instead of
the last epoch's (Keras's ``restore_best_weights=True``).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from ..layers import emit_logits
from .config import FineTuneConfiguration
from .objective import LossSpec, loss_terms, output_targets

__all__ = ["Stopping", "TrainState", "StepResult", "train_step", "score_batches", "run_epochs", "tensor_batches",
           "precision", "cpu_bf16", "DEFAULT_PATIENCE", "DEFAULT_MAX_EPOCHS"]

DEFAULT_PATIENCE = 20  # epochs without a better monitored loss before epochs=None stops
DEFAULT_MAX_EPOCHS = 200  # the most epochs epochs=None runs

Batch = tuple[tuple[torch.Tensor, ...], torch.Tensor]  # (inputs in argument order, targets)


@dataclass(frozen=True)
class Stopping:
    """When the epoch loop ends.

    Example:
        >>> Stopping(epochs=None)                 # until the loss stops improving (patience 20, at most 200)
        >>> Stopping(epochs=20)                   # exactly 20 epochs
        >>> Stopping(epochs=50, patience=3)       # at most 50, ended after 3 epochs without improvement
    """

    epochs: int | None = None  # epochs in total; None: until the monitored loss stops improving
    patience: int | None = None  # epochs without improvement that end the run; None with epochs=None: DEFAULT_PATIENCE
    max_epochs: int = DEFAULT_MAX_EPOCHS  # bound for epochs=None
    min_delta: float = 0.0  # an improvement must lower the monitored loss by more than this

    def __post_init__(self) -> None:
        for name in ("epochs", "patience"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                raise ValueError(f"{name} must be a positive integer or None, got {v!r}")
        if not isinstance(self.max_epochs, int) or isinstance(self.max_epochs, bool) or self.max_epochs <= 0:
            raise ValueError(f"max_epochs must be a positive integer, got {self.max_epochs!r}")
        if not isinstance(self.min_delta, (int, float)) or self.min_delta < 0:
            raise ValueError(f"min_delta must be a non-negative number, got {self.min_delta!r}")

    @property
    def limit(self) -> int:
        """The most epochs this run may take."""
        return self.epochs if self.epochs is not None else self.max_epochs

    @property
    def effective_patience(self) -> int | None:
        if self.patience is not None:
            return self.patience
        return DEFAULT_PATIENCE if self.epochs is None else None

    def to_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "patience": self.patience, "max_epochs": self.max_epochs,
                "min_delta": self.min_delta}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Stopping":
        return cls(**d)


@dataclass
class TrainState:
    """Where a run stands after its last finished epoch; what a checkpoint holds."""

    epoch: int = 0  # the next epoch to run
    history: list[dict[str, Any]] = field(default_factory=list)  # one metrics dict per finished epoch
    best: float = float("inf")  # the best monitored loss so far
    best_epoch: int | None = None  # the epoch that reached it
    waited: int = 0  # epochs since the last improvement
    stopped: bool = False  # early stopping ended the run
    best_weights: dict[str, torch.Tensor] | None = field(default=None, repr=False)  # the trained module's state at best_epoch
    step: int = 0  # steps of ``epoch`` already taken (a checkpoint taken mid-epoch)
    partial: list[float] | None = None  # with ``step``: the epoch's metric sums so far, over every worker

    def meta(self) -> dict[str, Any]:
        """The JSON-able part (everything but the weights)."""
        return {"epoch": self.epoch, "history": self.history, "best": self.best, "best_epoch": self.best_epoch,
                "waited": self.waited, "stopped": self.stopped, "step": self.step, "partial": self.partial}

    @classmethod
    def from_meta(cls, meta: dict[str, Any], best_weights: dict[str, torch.Tensor] | None = None) -> "TrainState":
        return cls(int(meta["epoch"]), list(meta["history"]), float(meta["best"]), meta.get("best_epoch"),
                   int(meta["waited"]), bool(meta["stopped"]), best_weights, int(meta.get("step") or 0),
                   meta.get("partial"))

    def finished(self, stopping: Stopping) -> bool:
        return self.stopped or self.epoch >= stopping.limit


@dataclass(frozen=True)
class StepResult:
    loss: float  # loss of the batch: the weighted sum over outputs (without the L1/L2 penalty)
    correct: int  # rows whose top class is the label, at the first output (0 when it is not a class score)
    rows: int
    losses: tuple[float, ...] = ()  # each output's own loss, in output order
    corrects: tuple[int, ...] = ()  # each output's correct rows, in output order


def _correct(out: torch.Tensor, y: torch.Tensor) -> int:
    if isinstance(out, torch.Tensor) and out.dim() == 2 and y.dim() == 1:
        return int((out.argmax(1) == y).sum())
    return 0


def _outputs(out: Any) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _weighted(specs: Sequence[LossSpec], terms: Sequence[torch.Tensor]) -> torch.Tensor:
    total: Any = None
    for spec, term in zip(specs, terms):
        weighted = term if spec.weight == 1.0 else spec.weight * term
        total = weighted if total is None else total + weighted
    return total


def _norm_statistics(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the running statistics a forward pass in training mode updates."""
    return {f"{name}.{b}": t.clone() for name, m in module.named_modules()
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.training
            for b, t in m.named_buffers(recurse=False) if t is not None}


def _restore_(module: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    buffers = dict(module.named_buffers())
    with torch.no_grad():
        for key, value in saved.items():
            buffers[key].copy_(value)


def train_step(model: nn.Module, inputs: Sequence[torch.Tensor], targets: Any, optimizer: torch.optim.Optimizer,
               config: FineTuneConfiguration, specs: Sequence[LossSpec], *, inner: nn.Module | None = None,
               autocast: Any = None, scaler: Any = None) -> StepResult:
    """One optimizer step: forward (``Output`` layers emit logits), the objective plus the
    fine-tune configuration's L1/L2 penalty, backward, gradient clipping, step.

    Everything that can fail on the caller's input (the targets, the forward pass, the
    losses) runs before the step: a call that raises leaves the parameters, the
    optimizer state and BatchNorm statistics as they were.

    Args:
        model: what runs forward (a DDP wrapper on Ray Train workers).
        inputs: the model's positional inputs (features in boundary order, or pixels).
        targets: one per output (a tuple in output order), or one tensor every output is
            scored against; class indices or target values.
        inner: the unwrapped module for the penalty and clipping (default: ``model``).
        autocast: a context manager for mixed precision (``torch.autocast``), or None.
        scaler: a ``torch.amp.GradScaler`` for fp16, or None.
    """
    inner = inner if inner is not None else model
    tgts = output_targets(specs, targets)
    if int(tgts[0].shape[0]) == 0:
        return _empty_step(model, inputs, optimizer, specs, inner, scaler)
    saved = _norm_statistics(inner)
    try:
        with autocast if autocast is not None else contextlib.nullcontext(), emit_logits(inner):
            outs = _outputs(model(*inputs))
            terms = loss_terms(specs, outs, tgts)
        loss = _weighted(specs, terms)
        penalty = config.penalty(inner)
        total = loss.float() + penalty if penalty is not None else loss.float()
        corrects = tuple(_correct(o, t) for o, t in zip(outs, tgts))
    except BaseException:
        _restore_(inner, saved)
        raise
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(total).backward()
        scaler.unscale_(optimizer)
        config.clip_gradients_(inner)
        scaler.step(optimizer)
        scaler.update()
    else:
        total.backward()
        config.clip_gradients_(inner)
        optimizer.step()
    rows = int(tgts[0].shape[0])
    return StepResult(float(loss.detach()), corrects[0], rows, tuple(float(t.detach()) for t in terms), corrects)


def _empty_step(model: nn.Module, inputs: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer,
                specs: Sequence[LossSpec], inner: nn.Module, scaler: Any) -> StepResult:
    """A step without rows, taken by a worker whose rows ran out while the others still
    have some (DDP needs every worker in every step): a forward through the model, a zero
    loss, zero gradients to average, the same optimizer step as the others."""
    with emit_logits(inner):
        outs = _outputs(model(*inputs))
    zero = sum((o.float().sum() * 0.0 for o in outs), torch.zeros((), device=outs[0].device))
    optimizer.zero_grad(set_to_none=False)
    if scaler is not None:
        scaler.scale(zero).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        zero.backward()
        optimizer.step()
    return StepResult(0.0, 0, 0, tuple(0.0 for _ in specs), tuple(0 for _ in specs))


def _score(model: nn.Module, batches: Iterable[Batch], specs: Sequence[LossSpec], autocast: Any = None) -> list[float]:
    """``[loss sum, correct, rows]`` then ``[loss sum, correct]`` of each output, over
    ``batches`` in eval mode, without gradients."""
    was = model.training
    model.eval()
    sums = [0.0] * (3 + 2 * len(specs))
    try:
        with torch.no_grad(), autocast if autocast is not None else contextlib.nullcontext(), emit_logits(model):
            for inputs, y in batches:
                outs = _outputs(model(*inputs))
                tgts = output_targets(specs, y)
                terms = loss_terms(specs, outs, tgts)
                n = int(tgts[0].shape[0])
                corrects = [_correct(o, t) for o, t in zip(outs, tgts)]
                sums[0] += float(_weighted(specs, terms)) * n
                sums[1] += corrects[0]
                sums[2] += n
                for i, (term, ok) in enumerate(zip(terms, corrects)):
                    sums[3 + 2 * i] += float(term) * n
                    sums[4 + 2 * i] += ok
    finally:
        model.train(was)
    return sums


def score_batches(model: nn.Module, batches: Iterable[Batch], specs: Sequence[LossSpec], *,
                  autocast: Any = None) -> tuple[float, int, int]:
    """(loss sum, correct, rows) of ``model`` over ``batches`` in eval mode, without
    gradients (the loss is the weighted sum over outputs, correct counts the first)."""
    loss_sum, correct, rows = _score(model, batches, specs, autocast)[:3]
    return loss_sum, int(correct), int(rows)


def _per_output(specs: Sequence[LossSpec], sums: Sequence[float], rows: float, prefix: str = "") -> dict[str, float]:
    """``<vertex>_loss`` and ``<vertex>_accuracy`` of each output, for models with several."""
    if len(specs) < 2:
        return {}
    out = {}
    for i, spec in enumerate(specs):
        out[f"{prefix}{spec.vertex}_loss"] = sums[2 * i] / max(rows, 1)
        out[f"{prefix}{spec.vertex}_accuracy"] = sums[2 * i + 1] / max(rows, 1)
    return out


def tensor_batches(inputs: Sequence[torch.Tensor], targets: torch.Tensor, batch_size: int, *, shuffle: bool = True,
                   seed: int = 0, rank: int = 0, drop_last: bool = False) -> Callable[[int], Iterator[Batch]]:
    """``epoch -> batches`` over tensors held in memory: a fresh permutation per epoch,
    seeded by (seed, epoch, rank), so a run and its resumed continuation see the same order."""
    n = int(targets.shape[0])

    def epoch_batches(epoch: int) -> Iterator[Batch]:
        if shuffle:
            g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch) * 101 + int(rank))
            order = torch.randperm(n, generator=g)
        else:
            order = None
        stop = n - n % batch_size if drop_last else n
        for i in range(0, stop, batch_size):
            if order is None:
                yield tuple(x[i:i + batch_size] for x in inputs), targets[i:i + batch_size]
            else:
                idx = order[i:i + batch_size]
                yield tuple(x[idx] for x in inputs), targets[idx]

    return epoch_batches


def cpu_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX), where bf16
    autocast is faster rather than slower than float32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # oneDNN's own check
    except (AttributeError, RuntimeError):
        return False


def precision(mode: bool | str, device: torch.device) -> tuple[Any, Any]:
    """``(autocast, scaler)`` for :func:`run_epochs` from the fine-tune configuration's
    ``mixed_precision``.

    ``False``: (None, None), float32. ``True``: on CUDA bfloat16 where the GPU supports
    it, else float16 with a ``GradScaler``; on CPU bfloat16 only where the CPU computes
    it natively (:func:`cpu_bf16`), else float32. ``"bf16"``/``"fp16"`` ask for one
    dtype: fp16 only on CUDA (with a scaler), bf16 on CUDA or a bf16 CPU; where the
    device cannot, training stays float32 (logged by the caller).
    """
    if not mode:
        return None, None
    if device.type == "cuda":
        dtype = torch.float16 if mode == "fp16" or (mode is True and not torch.cuda.is_bf16_supported()) else torch.bfloat16
        scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
        return torch.autocast("cuda", dtype=dtype), scaler
    if mode in (True, "bf16") and cpu_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16), None
    return None, None


def _state_copy(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def run_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    config: FineTuneConfiguration,
    specs: Sequence[LossSpec],
    train: Callable[..., Iterable[Batch]],
    *,
    validation: Callable[[], Iterable[Batch]] | None = None,
    stopping: Stopping = Stopping(),
    state: TrainState | None = None,
    inner: nn.Module | None = None,
    reduce: Callable[[list[float]], list[float]] | None = None,
    on_epoch: Callable[[TrainState, dict[str, Any]], None] | None = None,
    on_batch: Callable[[int, int, StepResult], None] | None = None,
    autocast: Any = None,
    scaler: Any = None,
    checkpoint_every: int = 0,
    on_checkpoint: Callable[[TrainState], None] | None = None,
) -> TrainState:
    """Train epoch after epoch until ``stopping`` says so. Returns the final state, whose
    ``best_weights`` are the trained module's state at its best epoch.

    Args:
        model: what runs forward (a DDP wrapper on Ray Train workers).
        optimizer, scheduler: from ``config`` (``build_optimizer``/``build_scheduler``);
            the scheduler is stepped once per epoch.
        config: the fine-tune configuration (penalty, clipping).
        specs: the losses of the model's outputs.
        train: ``epoch -> batches`` (see :func:`tensor_batches`); ``(epoch, step) -> batches`` from that step.
        validation: ``() -> batches`` of held-out data, scored after each epoch.
        stopping: epochs, patience and the bound for ``epochs=None``.
        state: where a resumed run stands (a fresh run starts at epoch 0).
        inner: the unwrapped module (default: ``model``); its state is what ``best_weights`` holds.
        reduce: sums metrics across workers (``all_reduce``); identity when alone.
        on_epoch: called after each epoch with the state and that epoch's metrics
            (checkpointing and reporting happen there); the metrics include
            ``stopped_early`` and ``best`` (this epoch is the best so far).
        on_batch: called as ``on_batch(epoch, step, result)`` after each step.
        checkpoint_every, on_checkpoint: every ``checkpoint_every`` steps of an epoch,
            ``on_checkpoint(state)`` with ``state.step`` the steps taken and
            ``state.partial`` the epoch's sums so far (reduced over the workers, who all
            get there in the same step). A state with ``step`` resumes that epoch there:
            ``train(epoch, step)`` gives the batches from that step on.
    """
    inner = inner if inner is not None else model
    state = state if state is not None else TrainState()
    patience = stopping.effective_patience
    reduce = reduce or (lambda values: values)
    while not state.finished(stopping):
        epoch = state.epoch
        started = time.perf_counter()
        model.train()
        size = 3 + 2 * len(specs)  # loss sum, correct, rows, then each output's loss sum and correct
        start = state.step
        sums = list(state.partial) if start and state.partial is not None else [0.0] * size
        for step, (inputs, y) in enumerate(train(epoch, start) if start else train(epoch), start=start):
            result = train_step(model, inputs, y, optimizer, config, specs, inner=inner, autocast=autocast, scaler=scaler)
            sums[0] += result.loss * result.rows
            sums[1] += result.correct
            sums[2] += result.rows
            for i, (term, ok) in enumerate(zip(result.losses, result.corrects)):
                sums[3 + 2 * i] += term * result.rows
                sums[4 + 2 * i] += ok
            if on_batch is not None:
                on_batch(epoch, step, result)
            if checkpoint_every and on_checkpoint is not None and (step + 1) % checkpoint_every == 0:
                state.step, state.partial = step + 1, reduce(list(sums))
                on_checkpoint(state)
        state.step, state.partial = 0, None
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        total = reduce(sums)
        total_loss, total_correct, total_rows = total[:3]
        metrics: dict[str, Any] = {"epoch": epoch, "loss": total_loss / max(total_rows, 1),
                                   "accuracy": total_correct / max(total_rows, 1), "rows": int(total_rows), "lr": lr,
                                   **_per_output(specs, total[3:], total_rows)}
        if validation is not None:
            v = reduce(_score(model, validation(), specs, autocast))
            v_loss, v_ok, v_rows = v[:3]
            metrics.update(val_loss=v_loss / max(v_rows, 1), val_accuracy=v_ok / max(v_rows, 1), val_rows=int(v_rows),
                           **_per_output(specs, v[3:], v_rows, "val_"))
        metrics["seconds"] = time.perf_counter() - started
        monitored = float(metrics.get("val_loss", metrics["loss"]))
        improved = monitored < state.best - stopping.min_delta
        if improved:
            state.best, state.best_epoch, state.waited = monitored, epoch, 0
            state.best_weights = _state_copy(inner)
        else:
            state.waited += 1
        state.stopped = patience is not None and state.waited >= patience
        metrics["best"] = improved
        metrics["stopped_early"] = state.stopped
        state.history.append(metrics)
        state.epoch = epoch + 1
        if on_epoch is not None:
            on_epoch(state, metrics)
    return state
