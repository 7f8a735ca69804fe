"""The commit protocol of featurize and predict: rows written where they are computed,
sealed into one file per input shard, committed as a new version of the output.

Layout under an output URI::

    manifest.json                   the newest committed version (a copy of _versions/<N>.json)
    _versions/00000002.json         each committed version, created exclusively: the commit
    _lock.json                      the lease of the job writing it (pipeline.lease)
    _attempt.json                   the fingerprint of a run in progress
    _inputs/part-00003-<h>.parquet  a group of loose files (path, label, size, version, index, error)
    _staging/00000003/<key>.parquet rows the model actors wrote, one slice per call, until shard 3 is sealed
    shards/<name>-<h>.parquet       one input shard's good rows
    errors/<name>-<h>.parquet       its error rows (row_id, path, reason), when it has any

1. The driver plans one output shard per input shard, named from the input and a hash of
   what is computed from it (:mod:`pipeline.plan`); a shard whose file already exists is
   done (an earlier run wrote it, or the committed version lists it).
2. The actors write each call's rows as a *slice* per shard (:class:`SliceWriter`), named
   by a hash of its row ids, and return one summary per slice (its shard, key and row
   ranges; never a row).
3. The driver keeps a coverage bitmap for each open shard only (:class:`Tracker`); when
   every row of a shard is covered (the read tasks mark each shard's last row), a seal task
   (:func:`pipeline.commit.seal`) merges its slices, drops rows a retried call wrote twice, checks that
   every row is there once, writes the errors file and then the shard file (each whole, or
   not at all), and deletes the slices.
4. The commit is a new version listing every shard (:func:`pipeline.commit.commit_version`), created
   exclusively so that two jobs cannot both commit; files that neither it nor the version
   before list are deleted afterwards (:func:`pipeline.commit.clean`), so the previous version stays
   readable until the next commit.

The driver's memory grows with shards (a few hundred bytes each), never with rows.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from freezeray import storage

from .readers import readable

__all__ = ["SliceWriter", "Tracker", "read_json", "write_json", "read_table", "write_table", "to_arrow_columns",
           "stage_dir", "compression", "node_id", "MANIFEST", "VERSIONS", "ATTEMPT", "STAGING", "INPUTS", "ERROR_SCHEMA"]

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
VERSIONS = "_versions"
ATTEMPT = "_attempt.json"
STAGING = "_staging"
INPUTS = "_inputs"
ERROR_SCHEMA = pa.schema([("row_id", pa.int64()), ("path", pa.string()), ("reason", pa.string())])


# ---------------------------------------------------------------------------------------
# small files


def read_json(uri: str, storage_options: dict | None) -> dict | None:
    try:
        return json.loads(storage.read_bytes(uri, storage_options))
    except FileNotFoundError:
        return None


def write_json(uri: str, data: dict, storage_options: dict | None) -> None:
    storage.write_bytes(uri, json.dumps(data, indent=2, sort_keys=True).encode(), storage_options)


def compression(schema: pa.Schema) -> dict[str, str]:
    """Tensor columns uncompressed (exactly rows x values x itemsize, read without
    decompression; dense features barely compress), the rest snappy."""
    return {f.name: ("none" if isinstance(f.type, pa.FixedShapeTensorType) else "snappy") for f in schema}


def write_table(uri: str, table: pa.Table, storage_options: dict | None) -> int:
    """Write one Parquet file whole (no dictionary encoding: values are mostly unique).
    Returns its size in bytes."""
    buf = io.BytesIO()
    pq.write_table(table, buf, use_dictionary=False, compression=compression(table.schema) or "snappy")
    data = buf.getvalue()
    storage.write_bytes(uri, data, storage_options)
    return len(data)


def read_table(uri: str, storage_options: dict | None, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(io.BytesIO(storage.read_bytes(uri, storage_options)), columns=columns)


def to_arrow_columns(batch: dict[str, np.ndarray]) -> dict[str, pa.Array]:
    """numpy columns -> Arrow: (N, ...) arrays become fixed-shape tensor columns, which
    plain pyarrow and pandas read (as arrays per row) and Ray Data reads as tensors."""
    out = {}
    for name, values in batch.items():
        arr = np.asarray(values)
        if arr.ndim > 1 and len(arr) == 0:  # pyarrow cannot infer a tensor type from zero rows
            value_type = pa.from_numpy_dtype(arr.dtype)
            tensor_type = pa.fixed_shape_tensor(value_type, list(arr.shape[1:]))
            storage_type = pa.list_(value_type, int(np.prod(arr.shape[1:])))
            out[name] = pa.ExtensionArray.from_storage(tensor_type, pa.array([], type=storage_type))
        elif arr.ndim > 1:
            out[name] = pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(arr))
        elif arr.dtype == object:
            out[name] = pa.array([str(v) for v in arr], pa.string())
        else:
            out[name] = pa.array(arr)
    return out


def stage_dir(shard: int) -> str:
    return f"{STAGING}/{shard:08d}"


def node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # pragma: no cover - outside Ray
        return ""


def _ranges(index: np.ndarray) -> str:
    """Sorted, distinct indices as ``"a-b,c-d"`` (inclusive runs)."""
    if len(index) == 0:
        return ""
    breaks = np.flatnonzero(np.diff(index) != 1)
    starts = np.concatenate([[index[0]], index[breaks + 1]])
    ends = np.concatenate([index[breaks], [index[-1]]])
    return ",".join(f"{a}-{b}" for a, b in zip(starts, ends))


def _parse_ranges(text: str) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in (r.split("-") for r in text.split(",") if r)]


# ---------------------------------------------------------------------------------------
# 2. the actors: one slice per shard per call


@dataclass(frozen=True)
class SliceWriter:
    """Writes a computed batch's rows where they were computed, as one slice per shard
    under ``_staging/``, and returns one summary row per slice (``shard``, ``slice``,
    ``ranges``, ``good``, ``bad``, ``bytes``, ``node``, ``total``: the shard's row count
    when the slice holds its last row, else -1). Rows carry ``shard``, ``index``, ``last``
    and ``error`` ("" when fine); ``columns`` are the data columns of good rows, in order.
    With ``lease_owner`` it checks, before writing, that the job still holds the output's
    lease."""

    output: str  # the output folder URI
    storage_options: dict[str, Any] | None  # fsspec options (travel to the actors, are never logged)
    columns: tuple[str, ...]  # data columns of good rows, in file order
    lease_owner: str | None = None  # the lease this job holds on the output
    class_names: tuple[str, ...] = field(default=())  # predictions: a class_name column from "predicted"

    def to_dict(self) -> dict[str, Any]:
        return {"output": self.output, "storage_options": self.storage_options, "columns": list(self.columns),
                "lease_owner": self.lease_owner, "class_names": list(self.class_names)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SliceWriter":
        return cls(d["output"], d.get("storage_options"), tuple(d["columns"]), d.get("lease_owner"),
                   tuple(d.get("class_names") or ()))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from .lease import assert_held

        if self.lease_owner is not None:
            assert_held(self.output, self.storage_options, self.lease_owner)
        if "class_name" in self.columns and "predicted" in batch:
            names = self.class_names
            batch = {**batch, "class_name": np.asarray([names[i] if i < len(names) else str(i)
                                                        for i in batch["predicted"]], dtype=object)}
        shards, index, last = np.asarray(batch["shard"]), np.asarray(batch["index"]), np.asarray(batch["last"])
        node = node_id()
        summaries: dict[str, list[Any]] = {k: [] for k in ("shard", "slice", "ranges", "good", "bad", "bytes",
                                                           "node", "total")}
        for sid in np.unique(shards):
            mine = shards == sid
            total = int(index[mine & last].max()) + 1 if (mine & last).any() else -1
            rows_mask = mine & (index >= 0)  # index -1: the marker of a shard without rows
            rows = {k: np.asarray(v)[rows_mask] for k, v in batch.items()}
            order = np.argsort(rows["index"], kind="stable")
            rows = {k: v[order] for k, v in rows.items()}
            key = hashlib.sha1(rows["row_id"].astype(np.int64).tobytes()).hexdigest()[:16] if len(order) else ""
            ok = readable(rows["error"])
            size = self._write(int(sid), key, rows, ok) if key else 0
            for name, value in (("shard", int(sid)), ("slice", key), ("ranges", _ranges(rows["index"])),
                                ("good", int(ok.sum())), ("bad", int((~ok).sum())), ("bytes", size), ("node", node),
                                ("total", total)):
                summaries[name].append(value)
        return {k: np.asarray(v, dtype=object if k in ("slice", "ranges", "node") else np.int64)
                for k, v in summaries.items()}

    def _write(self, shard: int, key: str, rows: dict[str, np.ndarray], ok: np.ndarray) -> int:
        folder = storage.join(self.output, stage_dir(shard))
        if (~ok).any():  # errors first: a data slice that exists means its slice is complete
            write_table(storage.join(folder, f"{key}.errors.parquet"), _errors_table(rows, ~ok), self.storage_options)
        good = {k: rows[k][ok] for k in self.columns}
        return write_table(storage.join(folder, f"{key}.parquet"), pa.table(to_arrow_columns(good)), self.storage_options)


def _errors_table(rows: dict[str, np.ndarray], bad: np.ndarray) -> pa.Table:
    return pa.table({"row_id": pa.array(rows["row_id"][bad].astype(np.int64)),
                     "path": pa.array([str(p) for p in rows["path"][bad]], pa.string()),
                     "reason": pa.array([str(e) for e in rows["error"][bad]], pa.string())}, schema=ERROR_SCHEMA)


# ---------------------------------------------------------------------------------------
# 3. the driver: which open shards are complete


@dataclass
class _Open:
    covered: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    slices: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # key -> its index ranges
    nodes: dict[str, int] = field(default_factory=dict)  # node -> rows its actors computed
    total: int | None = None


class Tracker:
    """Follows the slice summaries of the shards being computed: a coverage bitmap per open
    shard, dropped once the shard is complete. ``add`` returns the shards it completed, each
    with what :func:`seal` needs: its slices and the ranges to keep from each (a slice that
    a retried call wrote again contributes only rows no other slice holds)."""

    def __init__(self, totals: dict[int, int | None]) -> None:
        self.waiting = dict(totals)  # shard -> its rows when known in advance (loose files), else None
        self.open: dict[int, _Open] = {}

    def add(self, batch: dict[str, np.ndarray]) -> list[tuple[int, list[tuple[str, list[tuple[int, int]]]], list[str], int]]:
        done = []
        for sid, key, ranges, total, node in zip(batch["shard"], batch["slice"], batch["ranges"], batch["total"],
                                                 batch["node"]):
            sid = int(sid)
            if sid not in self.waiting:
                continue  # completed already (a retried call reported it again)
            state = self.open.setdefault(sid, _Open(total=self.waiting[sid]))
            if int(total) >= 0:
                state.total = int(total)
            spans = _parse_ranges(str(ranges))
            if key and key not in state.slices:
                state.slices[str(key)] = spans
                for a, b in spans:
                    if b >= len(state.covered):
                        state.covered = np.concatenate([state.covered, np.zeros(b + 1 - len(state.covered) + 1024, bool)])
                    state.covered[a:b + 1] = True
                state.nodes[str(node)] = state.nodes.get(str(node), 0) + sum(b - a + 1 for a, b in spans)
            if state.total is not None and (state.total == 0 or (len(state.covered) >= state.total
                                                                  and state.covered[:state.total].all())):
                done.append((sid, _keep_plan(state.slices), sorted(state.nodes, key=lambda n: -state.nodes[n]),
                             state.total))
                del self.open[sid], self.waiting[sid]
        return done

    @property
    def unfinished(self) -> list[int]:
        return sorted(self.waiting)


def _keep_plan(slices: dict[str, list[tuple[int, int]]]) -> list[tuple[str, list[tuple[int, int]]]]:
    """Each slice with the ranges of it to keep, in index order: a row is kept from the first
    slice (by its first index) that holds it."""
    plan = []
    covered: list[tuple[int, int]] = []
    for key, spans in sorted(slices.items(), key=lambda kv: (kv[1][0][0] if kv[1] else -1, kv[0])):
        keep = []
        for a, b in spans:
            for lo, hi in _subtract((a, b), covered):
                keep.append((lo, hi))
        if keep:
            plan.append((key, keep))
            covered = _merge(covered + keep)
    return plan


def _subtract(span: tuple[int, int], covered: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out, (a, b) = [], span
    for lo, hi in covered:
        if hi < a or lo > b:
            continue
        if lo > a:
            out.append((a, lo - 1))
        a = max(a, hi + 1)
        if a > b:
            return out
    if a <= b:
        out.append((a, b))
    return out


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


# ---------------------------------------------------------------------------------------
# 3b. sealing a shard (a Ray task; plain function, testable without Ray)


# ---------------------------------------------------------------------------------------
# resuming, committing, cleaning


