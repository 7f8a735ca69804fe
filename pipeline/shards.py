"""Committed Parquet outputs: shards written whole, an errors table, and a manifest
written last that is the commit (readers trust only what it lists).

Layout under an output URI::

    _attempt.json            written first: the fingerprint and shard plan of a run in progress
    shards/part-00000.parquet ...  one file per planned shard of input rows
    errors/part-00000.parquet ...  the rows of that shard that could not be read (when any)
    errors.parquet           every error row (path, reason), gathered at commit
    manifest.json            the commit

A shard's data file is written after its errors file, so a data file that exists means
the shard is complete; a resumed run skips those shards.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from surgery import storage

from .sources import readable

__all__ = ["ShardPlan", "ShardWriter", "to_arrow_columns", "read_json", "write_json", "read_table", "write_table",
           "MANIFEST", "ATTEMPT", "ERRORS"]

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
ATTEMPT = "_attempt.json"
ERRORS = "errors.parquet"
_ERROR_SCHEMA = pa.schema([("row_id", pa.int64()), ("path", pa.string()), ("reason", pa.string())])


def shard_path(i: int) -> str:
    return f"shards/part-{i:05d}.parquet"


def error_path(i: int) -> str:
    return f"errors/part-{i:05d}.parquet"


@dataclass(frozen=True)
class ShardPlan:
    """Input rows (in listing order) cut into shards of ``rows_per_shard``."""

    total: int
    rows_per_shard: int

    @property
    def count(self) -> int:
        return (self.total + self.rows_per_shard - 1) // self.rows_per_shard

    def shard_of(self, positions: np.ndarray) -> np.ndarray:
        return positions // self.rows_per_shard

    def size(self, i: int) -> int:
        return min(self.rows_per_shard, self.total - i * self.rows_per_shard)

    def to_dict(self) -> dict[str, int]:
        return {"total": self.total, "rows_per_shard": self.rows_per_shard}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ShardPlan":
        return cls(int(d["total"]), int(d["rows_per_shard"]))


def read_json(uri: str, storage_options: dict | None) -> dict | None:
    try:
        return json.loads(storage.read_bytes(uri, storage_options))
    except FileNotFoundError:
        return None


def write_json(uri: str, data: dict, storage_options: dict | None) -> None:
    storage.write_bytes(uri, json.dumps(data, indent=2, sort_keys=True).encode(), storage_options)


def write_table(uri: str, table: pa.Table, storage_options: dict | None) -> int:
    """Write one Parquet file whole. Returns its size in bytes.

    No dictionary encoding (feature values and paths are mostly unique). Tensor columns
    are stored uncompressed: their size is then exactly rows x values x itemsize (float16
    shards are half of float32 ones), they read without decompression, and dense
    features barely compress anyway; the other columns use snappy.
    """
    buf = io.BytesIO()
    compression = {f.name: ("none" if isinstance(f.type, pa.FixedShapeTensorType) else "snappy") for f in table.schema}
    pq.write_table(table, buf, use_dictionary=False, compression=compression or "snappy")
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


class ShardWriter:
    """Gathers streamed rows by shard and writes each shard when its last row arrives.

    Rows carry ``shard`` (the planned shard) and ``error`` ("" when fine). ``columns``
    picks the data columns of good rows, in order. ``before_write`` runs before each
    shard is written (the featurization checks its lease there).
    """

    def __init__(self, output: str, storage_options: dict | None, plan: ShardPlan, pending: Iterable[int],
                 columns: list[str], on_shard: Callable[[int, int, int], None] | None = None,
                 before_write: Callable[[], None] | None = None) -> None:
        self.output = output
        self.before_write = before_write
        self.storage_options = storage_options
        self.plan = plan
        self.columns = columns
        self.on_shard = on_shard
        self._expected = {i: plan.size(i) for i in pending}
        self._parts: dict[int, list[dict[str, np.ndarray]]] = {}
        self._seen: dict[int, int] = {}
        self.rows_written = 0
        self.errors_written = 0
        self.bytes_written = 0

    @property
    def open_shards(self) -> list[int]:
        return sorted(i for i, n in self._seen.items() if n < self._expected.get(i, 0))

    def add(self, batch: dict[str, np.ndarray]) -> None:
        shards = np.asarray(batch["shard"])
        for sid in np.unique(shards):
            mask = shards == sid
            part = {k: np.asarray(v)[mask] for k, v in batch.items()}
            sid = int(sid)
            if sid not in self._expected:
                raise RuntimeError(f"rows for shard {sid}, which is not pending; the job's input changed under it")
            self._parts.setdefault(sid, []).append(part)
            self._seen[sid] = self._seen.get(sid, 0) + int(mask.sum())
            if self._seen[sid] > self._expected[sid]:
                raise RuntimeError(f"shard {sid} got {self._seen[sid]} rows but plans {self._expected[sid]}: duplicated input")
            if self._seen[sid] == self._expected[sid]:
                self._write(sid)

    def _write(self, sid: int) -> None:
        if self.before_write is not None:
            self.before_write()
        parts = self._parts.pop(sid)
        rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        order = np.argsort(rows["row_id"], kind="stable")
        rows = {k: v[order] for k, v in rows.items()}
        bad = ~readable(rows["error"])
        if bad.any():
            errors = pa.table({"row_id": pa.array(rows["row_id"][bad].astype(np.int64)),
                               "path": pa.array([str(p) for p in rows["path"][bad]], pa.string()),
                               "reason": pa.array([str(e) for e in rows["error"][bad]], pa.string())})
            write_table(storage.join(self.output, error_path(sid)), errors, self.storage_options)
        good = {k: rows[k][~bad] for k in self.columns}
        table = pa.table(to_arrow_columns(good))
        self.bytes_written += write_table(storage.join(self.output, shard_path(sid)), table, self.storage_options)
        self.rows_written += int((~bad).sum())
        self.errors_written += int(bad.sum())
        if self.on_shard is not None:
            self.on_shard(sid, int((~bad).sum()), int(bad.sum()))


def completed_shards(output: str, storage_options: dict | None) -> dict[int, str]:
    """Shard index -> data file for every shard file present under ``output``."""
    fs, root = storage.filesystem(output, storage_options)
    folder = f"{root.rstrip('/')}/shards"
    if not storage.exists(storage.join(output, "shards"), storage_options):
        return {}
    done = {}
    for path in storage.retrying(lambda: fs.ls(folder, detail=False, refresh=True), f"list {output}/shards"):
        name = path.rsplit("/", 1)[-1]
        if name.startswith("part-") and name.endswith(".parquet"):
            done[int(name[5:10])] = f"shards/{name}"
    return done


def gather_errors(output: str, storage_options: dict | None, shards: Iterable[int]) -> pa.Table:
    tables = []
    for i in sorted(shards):
        try:
            tables.append(read_table(storage.join(output, error_path(i)), storage_options))
        except FileNotFoundError:
            continue  # the shard had no error rows
    return pa.concat_tables(tables) if tables else _ERROR_SCHEMA.empty_table()


def clear(output: str, storage_options: dict | None) -> None:
    """Delete what a freezeray output folder holds (only its own files)."""
    fs, root = storage.filesystem(output, storage_options)
    root = root.rstrip("/")
    for name in (MANIFEST, ATTEMPT, ERRORS):
        storage.delete(storage.join(output, name), storage_options)
    for folder in ("shards", "errors"):
        if storage.exists(storage.join(output, folder), storage_options):
            storage.retrying(lambda: fs.rm(f"{root}/{folder}", recursive=True), f"delete {output}/{folder}")
