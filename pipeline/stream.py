"""Streaming a committed feature set to Ray Train workers straight from its shards, for
feature sets larger than the workers' memory (``fit_head`` past
:data:`~pipeline.train.WORKER_MEMORY_BYTES` a worker, see :mod:`pipeline.head`).

Nothing is materialized on the driver or in Ray's object store: the driver hands each
worker a :class:`StreamPlan` (the shard files and their row counts, a few hundred bytes a
shard) and each worker reads its own shards from storage.

* **Order.** Every epoch the training shards are permuted (seeded by seed and epoch) and
  dealt to the workers, each shard to the worker with the fewest rows so far, so the
  workers' shares differ by less than a shard. A worker cuts its shards, in order, into
  *groups* of at least ``buffer_rows`` rows; a group is read (the next one in a background
  thread, so reading overlaps training), permuted (seeded by seed, epoch, rank and group)
  and batched. A worker's memory is two groups, whatever the rows of the set.
* **Lockstep.** DDP needs every worker to take the same number of steps: the plan knows
  every group's batch count from the manifest, so every worker takes the most any worker
  has, a worker whose rows ran out taking empty steps (zero gradients) until then. No row
  is left out and none is repeated.
* **Resume mid-epoch.** A step's rows are a function of (plan, epoch, rank, step) alone,
  so a checkpoint records the step it was taken after (every ``checkpoint_steps`` steps,
  about every :data:`CHECKPOINT_EVERY_SHARDS` shards); a restarted run, or a run whose
  worker Ray Train replaced, skips the groups before that step without reading them and
  goes on from the next row. Each row of an epoch is trained once.
* **Validation** without a pass over everything: a seeded share of the *shards* is held
  out (at least one), each worker scoring its part of them.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import numpy as np

from freezeray import storage

__all__ = ["StreamPlan", "plan_stream", "stream_batches", "validation_batches", "CHECKPOINT_EVERY_SHARDS",
           "BUFFER_ROWS", "LastBatch"]

CHECKPOINT_EVERY_SHARDS = 256  # a mid-epoch checkpoint about every this many shards (FREEZERAY_STREAM_CHECKPOINT_SHARDS)
BUFFER_ROWS = 16_384  # rows a worker shuffles together (a group), at least


@dataclass(frozen=True)
class StreamPlan:
    """What every worker needs to stream its part of a feature set (crosses the Ray
    boundary as a dict)."""

    storage_options: dict[str, Any] | None  # for the shard URIs (never logged)
    shards: tuple[tuple[str, int], ...]  # (URI, rows) of the training shards
    validation: tuple[tuple[str, int], ...]  # (URI, rows) of the held-out shards
    columns: tuple[str, ...]  # feature columns, in the head's argument order
    shapes: tuple[tuple[int, ...], ...]  # each column's shape per row (for empty batches)
    workers: int  # Ray Train workers
    batch_size: int  # rows per worker per step
    seed: int
    shuffle: bool = True
    buffer_rows: int = BUFFER_ROWS
    checkpoint_steps: int = 0  # a mid-epoch checkpoint every this many steps (0: at epoch ends only)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shards"], d["validation"] = [list(s) for s in self.shards], [list(s) for s in self.validation]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StreamPlan":
        return cls(**{**d, "shards": tuple((str(u), int(n)) for u, n in d["shards"]),
                      "validation": tuple((str(u), int(n)) for u, n in d["validation"]), "columns": tuple(d["columns"]),
                      "shapes": tuple(tuple(s) for s in d["shapes"])})

    @property
    def rows(self) -> int:
        return sum(n for _, n in self.shards)

    def assignment(self, epoch: int) -> list[list[int]]:
        """Each worker's training shards (indices into ``shards``) for ``epoch``, in order."""
        order = (np.random.default_rng([self.seed, epoch, 7]).permutation(len(self.shards)) if self.shuffle
                 else np.arange(len(self.shards)))
        dealt: list[list[int]] = [[] for _ in range(self.workers)]
        load = [0] * self.workers
        for i in order:
            w = min(range(self.workers), key=lambda r: (load[r], r))
            dealt[w].append(int(i))
            load[w] += self.shards[i][1]
        return dealt

    def groups(self, epoch: int, rank: int) -> list[list[int]]:
        """A worker's shards for ``epoch`` cut into groups of at least ``buffer_rows`` rows."""
        out: list[list[int]] = []
        current: list[int] = []
        rows = 0
        for i in self.assignment(epoch)[rank]:
            current.append(i)
            rows += self.shards[i][1]
            if rows >= self.buffer_rows:
                out.append(current)
                current, rows = [], 0
        if current:
            out.append(current)
        return out

    def group_batches(self, epoch: int, rank: int) -> list[int]:
        return [math.ceil(sum(self.shards[i][1] for i in g) / self.batch_size) for g in self.groups(epoch, rank)]

    def steps(self, epoch: int) -> int:
        """Steps every worker takes in ``epoch``: the most any worker's rows need."""
        return max((sum(self.group_batches(epoch, r)) for r in range(self.workers)), default=0)


def plan_stream(fset: Any, validation: Any, workers: int, batch_size: int, seed: int, shuffle: bool,
                storage_options: dict[str, Any] | None, buffer_rows: int = BUFFER_ROWS) -> StreamPlan:
    """The stream of ``fset`` for ``workers``: ``validation`` is a fraction (a seeded share
    of the shards is held out), a :class:`~pipeline.FeatureSet`, or None.

    Raises:
        ValueError: a fraction to hold out of a set with fewer than two shards.
    """
    shards = [(storage.join(fset.uri, s.path), s.rows) for s in fset.shards if s.rows]
    held: list[tuple[str, int]] = []
    if isinstance(validation, float):
        if len(shards) < 2:
            raise ValueError(f"streaming holds validation out by shard, and {fset.uri!r} has {len(shards)}; pass "
                             "validation=<another feature set>, or epochs=N without validation")
        n = min(len(shards) - 1, max(1, round(validation * len(shards))))
        chosen = set(np.random.default_rng([seed, 11]).permutation(len(shards))[:n].tolist())
        held = [s for i, s in enumerate(shards) if i in chosen]
        shards = [s for i, s in enumerate(shards) if i not in chosen]
    elif validation is not None:
        held = [(storage.join(validation.uri, s.path), s.rows) for s in validation.shards if s.rows]
    every = int(os.environ.get("FREEZERAY_STREAM_CHECKPOINT_SHARDS") or CHECKPOINT_EVERY_SHARDS)
    mean_rows = sum(n for _, n in shards) / max(len(shards), 1)
    steps = max(1, round(every * mean_rows / max(1, batch_size * workers)))
    return StreamPlan(storage_options, tuple(shards), tuple(held), tuple(fset.feature_columns),
                      tuple(tuple(s) for s in fset.feature_shapes), workers, batch_size, seed, shuffle, buffer_rows, steps)


class _Buffer:
    """Memory for one group, kept and reused: a fresh 100 MB array per group costs its page
    faults every time (large allocations are mapped anew), more than reading the group."""

    def __init__(self, plan: StreamPlan) -> None:
        self.plan, self.rows = plan, 0
        self.ids = np.zeros(0, np.int64)
        self.labels = np.zeros(0, np.int64)
        self.feats = tuple(np.zeros((0, *s), np.float32) for s in plan.shapes)

    def ensure(self, rows: int) -> None:
        if rows > len(self.ids):
            size = int(rows * 1.25)
            self.ids, self.labels = np.zeros(size, np.int64), np.zeros(size, np.int64)
            self.feats = tuple(np.zeros((size, *s), np.float32) for s in self.plan.shapes)


def _read(plan: StreamPlan, shards: list[tuple[str, int]], buf: _Buffer | None = None
          ) -> tuple[np.ndarray, tuple[np.ndarray, ...], np.ndarray]:
    """(row ids, features as float32 per column, labels) of these shards, concatenated
    (into ``buf``'s memory when given)."""
    import io

    import pyarrow.parquet as pq

    buf = buf if buf is not None else _Buffer(plan)
    total = sum(n for _, n in shards)
    buf.ensure(total)
    at = 0
    for uri, rows in shards:
        data = storage.read_bytes(uri, plan.storage_options)  # one thread: it runs beside the training thread
        table = pq.read_table(io.BytesIO(data), columns=["row_id", "label", *plan.columns], use_threads=False)
        if table.num_rows != rows:
            raise RuntimeError(f"{uri} holds {table.num_rows} rows where its manifest says {rows}")
        buf.ids[at:at + rows] = table.column("row_id").to_numpy()
        buf.labels[at:at + rows] = table.column("label").to_numpy()
        for f, c in zip(buf.feats, plan.columns):
            np.copyto(f[at:at + rows], table.column(c).combine_chunks().to_numpy_ndarray(), casting="unsafe")
        at += rows
    return buf.ids[:total], tuple(f[:total] for f in buf.feats), buf.labels[:total]


class _Prefetch:
    """Reads the groups of a worker's epoch in a background thread, one ahead, into two
    buffers taken in turn (a group is trained on while the next is read)."""

    def __init__(self, plan: StreamPlan, groups: list[list[int]], buffers: tuple[_Buffer, _Buffer]) -> None:
        self.plan, self.groups, self.buffers = plan, groups, buffers
        self._next: dict[int, Any] = {}
        self._thread: threading.Thread | None = None

    def _load(self, g: int) -> None:
        try:
            self._next[g] = _read(self.plan, [self.plan.shards[i] for i in self.groups[g]], self.buffers[g % 2])
        except BaseException as exc:  # raised in the training thread when the group is taken
            self._next[g] = exc

    def start(self, g: int) -> None:
        if g < len(self.groups):
            self._thread = threading.Thread(target=self._load, args=(g,), name="freezeray-prefetch", daemon=True)
            self._thread.start()

    def take(self, g: int) -> Any:
        if g not in self._next:
            if self._thread is None or not self._thread.is_alive():
                self._load(g)
            else:
                self._thread.join()
        value = self._next.pop(g)
        if isinstance(value, BaseException):
            raise value
        return value


class LastBatch:
    """The row ids of the batch a stream handed out last (for callbacks that check which
    rows were trained)."""

    ids: list[int] = []


_BUFFERS: dict[int, tuple[_Buffer, _Buffer]] = {}  # per plan (by id), for the life of the worker process


def stream_batches(plan: StreamPlan, epoch: int, rank: int, start: int = 0, device: Any = None,
                   last: LastBatch | None = None) -> Iterator[Any]:
    """Worker ``rank``'s batches of ``epoch`` from step ``start`` on, exactly
    ``plan.steps(epoch) - start`` of them: its rows (``(features, labels)`` as torch
    tensors), then empty batches (no rows) while other workers still have rows."""
    import torch

    groups = plan.groups(epoch, rank)
    counts = plan.group_batches(epoch, rank)
    total = plan.steps(epoch)
    g, skipped = 0, 0
    while g < len(groups) and skipped + counts[g] <= start:  # whole groups before the resume point: not read
        skipped += counts[g]
        g += 1
    step = skipped
    if id(plan) not in _BUFFERS:
        _BUFFERS.clear()
        _BUFFERS[id(plan)] = (_Buffer(plan), _Buffer(plan))
    reader = _Prefetch(plan, groups, _BUFFERS[id(plan)])
    reader.start(g)
    while g < len(groups):
        ids, feats, labels = reader.take(g)
        reader.start(g + 1)
        order = (np.random.default_rng([plan.seed, epoch, rank, g]).permutation(len(ids)) if plan.shuffle
                 else np.arange(len(ids)))
        for i in range(0, len(ids), plan.batch_size):
            if step >= start:
                idx = order[i:i + plan.batch_size]
                if last is not None:
                    last.ids = ids[idx].tolist()
                x = tuple(torch.from_numpy(f[idx]).to(device) for f in feats)
                yield x, torch.from_numpy(labels[idx]).to(device)
            step += 1
        g += 1
    while step < total:  # this worker's rows ran out: keep DDP in step with empty batches
        if step >= start:
            if last is not None:
                last.ids = []
            yield (tuple(torch.zeros((0, *s), dtype=torch.float32, device=device) for s in plan.shapes),
                   torch.zeros(0, dtype=torch.int64, device=device))
        step += 1


def validation_batches(plan: StreamPlan, rank: int, device: Any = None) -> Iterator[Any]:
    """Worker ``rank``'s share of the held-out shards, in batches, in order."""
    import torch

    mine = list(plan.validation[rank::plan.workers])
    for start in range(0, len(mine), 4):
        _, feats, labels = _read(plan, mine[start:start + 4])
        for i in range(0, len(labels), plan.batch_size):
            yield (tuple(torch.from_numpy(f[i:i + plan.batch_size]).to(device) for f in feats),
                   torch.from_numpy(labels[i:i + plan.batch_size]).to(device))
