"""Committed Parquet outputs, written where the rows are computed.

Layout under an output URI::

    _lock.json               the lease of the job writing it (see pipeline.lease)
    _attempt.json            written first: the fingerprint and shard plan of a run in progress
    shards/part-00003-<key>.parquet   the good rows of one slice of shard 3
    errors/part-00003-<key>.parquet   the rows of that slice that could not be read (when any)
    errors.parquet           every error row (row_id, path, reason), gathered at commit
    manifest.json            the commit (pipeline.manifest)

Rows are planned into shards by their position in the input listing. The Ray actors that
compute rows write them (:class:`PartWriter`): each call splits its batch by shard and
writes one *slice* per shard, named by a hash of the slice's row ids. A retried call (an
actor killed, a node lost) recomputes the same rows and rewrites the same files, so rows
are never written twice under two names; the driver still checks, at commit, that every
planned row is in exactly one slice (:func:`assemble`), and drops any slice another one
duplicates. Slices that no manifest lists (a run that died) are deleted at commit.

The driver never touches feature bytes: it gets a few numbers per row back (its id,
shard, slice and whether it was readable), decides when a shard is complete, and commits.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from surgery import storage

from .manifest import ERRORS, Part, Shard, ShardPlan
from .sources import readable

__all__ = ["ShardPlan", "PartWriter", "Slices", "existing_slices", "assemble", "delete_slices", "gather_errors",
           "unlisted", "to_arrow_columns", "read_json", "write_json", "read_table", "write_table", "clear", "part_path",
           "prepare_output", "settle", "commit_manifest", "MANIFEST", "ATTEMPT", "ERRORS"]

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
ATTEMPT = "_attempt.json"
_ERROR_SCHEMA = pa.schema([("row_id", pa.int64()), ("path", pa.string()), ("reason", pa.string())])


def slice_key(path: str) -> str:
    """The slice key in a part's file name (``shards/part-00003-<key>.parquet``)."""
    return path.rsplit("-", 1)[-1].removesuffix(".parquet")


def part_path(shard: int, key: str) -> str:
    return f"shards/part-{shard:05d}-{key}.parquet"


def error_part_path(shard: int, key: str) -> str:
    return f"errors/part-{shard:05d}-{key}.parquet"


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


def _key(row_ids: np.ndarray) -> str:
    return hashlib.sha1(np.sort(np.asarray(row_ids, dtype=np.int64)).tobytes()).hexdigest()[:16]


def _node() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # pragma: no cover - outside Ray
        return ""


@dataclass(frozen=True)
class PartWriter:
    """Writes the rows of a computed batch where they were computed, and returns a few
    numbers per row for the driver (``row_id``, ``shard``, ``slice``, ``ok``, ``bytes``,
    ``node``). Rows carry ``shard`` (the planned shard) and ``error`` ("" when fine);
    ``columns`` are the data columns of good rows, in order. With ``lease_owner`` it
    checks, before writing, that the job still holds the output's lease.
    """

    output: str  # the output folder URI
    storage_options: dict[str, Any] | None  # fsspec options (travel to the actors, are never logged)
    columns: tuple[str, ...]  # data columns of good rows, in file order
    lease_owner: str | None = None  # the lease this job holds on the output
    class_names: tuple[str, ...] = field(default=())  # predictions: a class_name column from "predicted"

    def to_dict(self) -> dict[str, Any]:
        return {"output": self.output, "storage_options": self.storage_options, "columns": list(self.columns),
                "lease_owner": self.lease_owner, "class_names": list(self.class_names)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PartWriter":
        return cls(d["output"], d.get("storage_options"), tuple(d["columns"]), d.get("lease_owner"),
                   tuple(d.get("class_names") or ()))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from .lease import assert_held

        if self.lease_owner is not None:
            assert_held(self.output, self.storage_options, self.lease_owner)
        if self.class_names and "predicted" in batch:
            names = self.class_names
            batch = {**batch, "class_name": np.asarray([names[i] if i < len(names) else str(i)
                                                        for i in batch["predicted"]], dtype=object)}
        shards = np.asarray(batch["shard"])
        n = len(shards)
        out = {"row_id": np.asarray(batch["row_id"], dtype=np.int64), "shard": shards.astype(np.int64),
               "slice": np.empty(n, dtype=object), "ok": readable(batch["error"]),
               "bytes": np.zeros(n, dtype=np.int64), "node": np.full(n, _node(), dtype=object)}
        for sid in np.unique(shards):
            mask = shards == sid
            rows = {k: np.asarray(v)[mask] for k, v in batch.items()}
            key = _key(rows["row_id"])
            size = self._write_slice(int(sid), key, rows)
            out["slice"][mask] = key
            out["bytes"][np.flatnonzero(mask)[:1]] = size  # the slice's size, once
        return out

    def _write_slice(self, shard: int, key: str, rows: dict[str, np.ndarray]) -> int:
        order = np.argsort(rows["row_id"], kind="stable")
        rows = {k: v[order] for k, v in rows.items()}
        bad = ~readable(rows["error"])
        if bad.any():  # errors first: a data part that exists means its slice is complete
            errors = pa.table({"row_id": pa.array(rows["row_id"][bad].astype(np.int64)),
                               "path": pa.array([str(p) for p in rows["path"][bad]], pa.string()),
                               "reason": pa.array([str(e) for e in rows["error"][bad]], pa.string())})
            write_table(storage.join(self.output, error_part_path(shard, key)), errors, self.storage_options)
        good = {k: rows[k][~bad] for k in self.columns}
        return write_table(storage.join(self.output, part_path(shard, key)), pa.table(to_arrow_columns(good)),
                           self.storage_options)


@dataclass
class Slices:
    """What is known of the slices of one output: per shard, slice key -> (good row ids,
    error row ids, bytes, node)."""

    by_shard: dict[int, dict[str, tuple[np.ndarray, np.ndarray, int, str]]] = field(default_factory=dict)

    def add(self, shard: int, key: str, good: np.ndarray, bad: np.ndarray, size: int, node: str) -> None:
        self.by_shard.setdefault(shard, {})[key] = (np.asarray(good, dtype=np.int64), np.asarray(bad, dtype=np.int64),
                                                     size, node)

    def add_summaries(self, batch: dict[str, np.ndarray]) -> list[tuple[int, int, int]]:
        """Record the slices a batch of per-row summaries reports (columns ``shard``,
        ``slice``, ``row_id``, ``ok``, ``bytes``, ``node``, as the actors return them). A
        slice already known (a retried call rewrote the same rows) is skipped. Returns
        (shard, good rows, error rows) of each new slice."""
        shards, keys, ok = np.asarray(batch["shard"]), np.asarray(batch["slice"], dtype=object), np.asarray(batch["ok"])
        ids, sizes, nodes = np.asarray(batch["row_id"]), np.asarray(batch["bytes"]), np.asarray(batch["node"], dtype=object)
        added = []
        for sid in np.unique(shards):
            in_shard = shards == sid
            for key in np.unique(keys[in_shard]):
                if str(key) in self.by_shard.get(int(sid), {}):
                    continue
                m = in_shard & (keys == key)
                good, bad = ids[m & ok], ids[m & ~ok]
                self.add(int(sid), str(key), good, bad, int(sizes[m].sum()), str(nodes[m][0]))
                added.append((int(sid), len(good), len(bad)))
        return added

    def rows_in(self, shard: int) -> int:
        return sum(len(g) + len(b) for g, b, _, _ in self.by_shard.get(shard, {}).values())

    def only(self, shards: Iterable[Shard]) -> "Slices":
        """The slices these manifest entries list."""
        return Slices({s.shard: {slice_key(p.path): self.by_shard[s.shard][slice_key(p.path)] for p in s.parts}
                       for s in shards})


def _list(output: str, folder: str, storage_options: dict | None) -> list[str]:
    if not storage.exists(storage.join(output, folder), storage_options):
        return []
    fs, root = storage.filesystem(output, storage_options)
    found = storage.retrying(lambda: fs.ls(f"{root.rstrip('/')}/{folder}", detail=False, refresh=True),
                             f"list {output}/{folder}")
    return sorted(p.rsplit("/", 1)[-1] for p in found)


def _parse(name: str) -> tuple[int, str] | None:
    if not (name.startswith("part-") and name.endswith(".parquet")):
        return None
    parts = name[5:-8].split("-")
    if len(parts) != 2 or not parts[0].isdigit():
        return None
    return int(parts[0]), parts[1]


def existing_slices(output: str, storage_options: dict | None) -> Slices:
    """The slices an earlier, uncommitted attempt wrote (their row ids read back)."""
    found = Slices()
    errors = {p for p in (_parse(n) for n in _list(output, "errors", storage_options)) if p}
    for name in _list(output, "shards", storage_options):
        parsed = _parse(name)
        if parsed is None:
            continue
        shard, key = parsed
        uri = storage.join(output, part_path(shard, key))
        good = read_table(uri, storage_options, ["row_id"]).column("row_id").to_numpy()
        bad = (read_table(storage.join(output, error_part_path(shard, key)), storage_options, ["row_id"])
               .column("row_id").to_numpy() if (shard, key) in errors else np.zeros(0, dtype=np.int64))
        fs, path = storage.filesystem(uri, storage_options)
        size = int(storage.retrying(lambda: fs.info(path), f"look at {uri}").get("size") or 0)
        found.add(shard, key, good, bad, size, "")
    return found


def assemble(plan: ShardPlan, slices: Slices, shards: Iterable[int]) -> tuple[dict[int, Shard], list[int], list[tuple[int, str]]]:
    """Which of ``shards`` are complete: each planned row in exactly one slice. Returns the
    complete shards (as manifest entries), the incomplete ones, and redundant slices (a
    slice whose rows another slice already holds, from a retried call)."""
    complete: dict[int, Shard] = {}
    incomplete, redundant = [], []
    for sid in shards:
        start = sid * plan.rows_per_shard
        wanted = np.arange(start, start + plan.size(sid), dtype=np.int64)
        kept: list[str] = []
        covered = np.zeros(len(wanted), dtype=bool)
        options = slices.by_shard.get(sid, {})
        for key, (good, bad, _, _) in sorted(options.items(), key=lambda kv: -(len(kv[1][0]) + len(kv[1][1]))):
            ids = np.concatenate([good, bad]) - start
            if len(ids) == 0 or ids.min() < 0 or ids.max() >= len(wanted) or covered[ids].any():
                redundant.append((sid, key))
                continue
            covered[ids] = True
            kept.append(key)
        if not covered.all():
            incomplete.append(sid)
            continue
        parts = [Part(path=part_path(sid, k), rows=len(options[k][0]), bytes=options[k][2], node=options[k][3] or None)
                 for k in sorted(kept)]
        complete[sid] = Shard(shard=sid, rows=sum(p.rows for p in parts), errors=sum(len(options[k][1]) for k in kept),
                              bytes=sum(p.bytes for p in parts), parts=parts)
    return complete, incomplete, redundant


def delete_slices(output: str, storage_options: dict | None, slices: Iterable[tuple[int, str]]) -> None:
    for shard, key in slices:
        storage.delete(storage.join(output, part_path(shard, key)), storage_options)
        storage.delete(storage.join(output, error_part_path(shard, key)), storage_options)


def gather_errors(output: str, storage_options: dict | None, shards: Iterable[Shard]) -> pa.Table:
    """Every error row of the committed slices, in row-id order."""
    tables = []
    for shard in shards:
        if not shard.errors:
            continue
        for part in shard.parts:
            key = slice_key(part.path)
            try:
                tables.append(read_table(storage.join(output, error_part_path(shard.shard, key)), storage_options))
            except FileNotFoundError:
                continue  # this slice of the shard had no error rows
    table = pa.concat_tables(tables) if tables else _ERROR_SCHEMA.empty_table()
    return table.take(pa.array(np.argsort(table.column("row_id").to_numpy(), kind="stable"))) if tables else table


def unlisted(output: str, storage_options: dict | None, keep: Iterable[Shard]) -> list[tuple[int, str]]:
    """Slices in the output folder that ``keep`` does not list."""
    listed = {(s.shard, slice_key(p.path)) for s in keep for p in s.parts}
    found = {p for folder in ("shards", "errors") for p in (_parse(n) for n in _list(output, folder, storage_options)) if p}
    return sorted(found - listed)


def clear(output: str, storage_options: dict | None) -> None:
    """Delete what a freezeray output folder holds (only its own files)."""
    fs, root = storage.filesystem(output, storage_options)
    root = root.rstrip("/")
    for name in (MANIFEST, ATTEMPT, ERRORS):
        storage.delete(storage.join(output, name), storage_options)
    for folder in ("shards", "errors"):
        if storage.exists(storage.join(output, folder), storage_options):
            storage.retrying(lambda: fs.rm(f"{root}/{folder}", recursive=True), f"delete {output}/{folder}")


def prepare_output(output: str, storage_options: dict | None, fp: str, plan: ShardPlan, committed: dict | None,
                   overwrite: bool, what: str) -> tuple[list[int], Slices]:
    """Make ``output`` ready for a run (under its lease). Returns the shards it still needs
    (all of them, or those an interrupted attempt with the same fingerprint and plan left
    incomplete) and the slices of the complete ones. Another run's ``what`` (``features``,
    ``predictions``), committed or unfinished, is cleared only with ``overwrite``; an
    unfinished attempt of the same fingerprint with another plan (another shard size) holds
    the same rows and is discarded."""
    if committed is not None:
        if not overwrite:
            raise FileExistsError(
                f"{output!r} already holds {what} with fingerprint {committed.get('fingerprint')}, "
                f"but this run's fingerprint is {fp} (another model, preprocessing, dtype or input); "
                "pass overwrite=True to replace them, or choose another output"
            )
        clear(output, storage_options)
    attempt = read_json(storage.join(output, ATTEMPT), storage_options)
    if attempt is not None and attempt.get("fingerprint") != fp and not overwrite:
        raise FileExistsError(f"{output!r} holds unfinished {what} with fingerprint {attempt.get('fingerprint')}, "
                              f"not this run's {fp}; pass overwrite=True to discard them, or choose another output")
    if attempt is None or attempt.get("fingerprint") != fp or attempt.get("plan") != plan.to_dict():
        clear(output, storage_options)  # also the stray slices of a run that died before writing its attempt
        write_json(storage.join(output, ATTEMPT), {"fingerprint": fp, "plan": plan.to_dict()}, storage_options)
        return list(range(plan.count)), Slices()
    found = existing_slices(output, storage_options)
    complete, incomplete, redundant = assemble(plan, found, range(plan.count))
    stale = [(sid, key) for sid in incomplete for key in found.by_shard.get(sid, {})]
    delete_slices(output, storage_options, stale + redundant)
    if complete:
        log.info("resuming %s at %s: %d of %d shards already written", what, output, len(complete), plan.count)
    return sorted(incomplete), found.only(complete.values())


def settle(output: str, storage_options: dict | None, plan: ShardPlan, slices: Slices, what: str) -> tuple[list[Shard], pa.Table]:
    """The manifest entries of every planned shard and the gathered error rows (written to
    ``errors.parquet``); redundant and unlisted slices are deleted.

    Raises:
        RuntimeError: a planned shard is incomplete (rows were lost).
    """
    complete, incomplete, redundant = assemble(plan, slices, range(plan.count))
    if incomplete:
        raise RuntimeError(f"{what} lost rows: shards {incomplete[:10]} are incomplete")
    shards = [complete[i] for i in range(plan.count)]
    delete_slices(output, storage_options, redundant + unlisted(output, storage_options, shards))
    errors = gather_errors(output, storage_options, shards)
    write_table(storage.join(output, ERRORS), errors, storage_options)
    return shards, errors


def commit_manifest(output: str, manifest: Any, storage_options: dict | None, what: str) -> None:
    """The commit: the manifest is created, never overwritten, so two jobs cannot both
    commit; then the attempt record goes."""
    try:
        storage.create_bytes(storage.join(output, MANIFEST), json.dumps(manifest.to_dict(), indent=2, sort_keys=True).encode(),
                             storage_options)
    except FileExistsError:
        raise FileExistsError(f"another job committed {what} at {output!r} first; this run's shards were not "
                              "committed") from None
    storage.delete(storage.join(output, ATTEMPT), storage_options)
