"""Sealing shards and committing versions (steps 3 and 4 of :mod:`pipeline.shards`): a
complete shard's slices merged into its file, a committed shard rewritten without model
work, the versions of an output, and the clean-up after a commit.

Why a manifest of our own and not a table format: Delta Lake (``deltalake`` 1.6.6, measured
here) refuses float16 in any form ("Invalid data type for Delta Lake: Float16": a
fixed-shape tensor, a fixed-size list, a list) and stores float32 features as variable
``list<float>``: twice the bytes of the default features, without their shape. The commit
log here keeps Delta's rules: files written first by the workers, an exclusive create of
the next version by the one writer holding the lease, readers trusting only what a version
lists, and superseded files deleted only once a newer version is committed.
"""

from __future__ import annotations

import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from freezeray import storage

from .manifest import parse_manifest
from .shards import (
    ATTEMPT,
    ERROR_SCHEMA,
    INPUTS,
    MANIFEST,
    STAGING,
    VERSIONS,
    compression,
    node_id,
    read_json,
    read_table,
    stage_dir,
    write_table,
)

__all__ = ["errors_of", "seal", "rewrite", "shard_stats", "done_shards", "latest", "commit_version", "clean"]

_STATS_KEY = b"freezeray.shard"


def _in_ranges(index: np.ndarray, ranges: list[tuple[int, int]]) -> np.ndarray:
    mask = np.zeros(len(index), dtype=bool)
    for a, b in ranges:
        mask |= (index >= a) & (index <= b)
    return mask


class _ShardFile:
    """A Parquet file written row group by row group into a local temporary file, then
    published whole (renamed into place, or uploaded: an object appears only complete)."""

    def __init__(self, uri: str, storage_options: dict | None, schema: pa.Schema) -> None:
        self.uri, self.storage_options = uri, storage_options
        fd, self.tmp = tempfile.mkstemp(prefix="freezeray-", suffix=".parquet")
        os.close(fd)
        self.writer = pq.ParquetWriter(self.tmp, schema, use_dictionary=False, compression=compression(schema))

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            self.writer.write_table(table)

    def publish(self, stats: dict[str, Any]) -> int:
        self.writer.add_key_value_metadata({_STATS_KEY.decode(): json.dumps(stats)})
        self.writer.close()
        size = os.path.getsize(self.tmp)
        try:
            fs, path = storage.filesystem(self.uri, self.storage_options)
            if storage.is_local(self.uri):
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                local = f"{path}.tmp-{os.getpid()}"
                with open(self.tmp, "rb") as src, open(local, "wb") as dst:
                    while chunk := src.read(8 << 20):
                        dst.write(chunk)
                    dst.flush()
                    os.fsync(dst.fileno())
                os.replace(local, path)
            else:
                storage.retrying(lambda: fs.put_file(self.tmp, path), f"write {self.uri}")
        finally:
            os.unlink(self.tmp)
        return size

    def abort(self) -> None:
        try:
            self.writer.close()
        finally:
            if os.path.exists(self.tmp):
                os.unlink(self.tmp)


def shard_stats(uri: str, storage_options: dict | None) -> dict[str, Any] | None:
    """What :func:`seal` recorded in a shard file's footer (None: no such file)."""
    fs, path = storage.filesystem(uri, storage_options)

    def read() -> dict[str, Any] | None:
        try:
            with fs.open(path, "rb") as f:
                meta = pq.ParquetFile(f).metadata
                size = int(fs.info(path).get("size") or 0)
        except FileNotFoundError:
            return None
        raw = (meta.metadata or {}).get(_STATS_KEY)
        return {**json.loads(raw), "bytes": size} if raw else None

    return storage.retrying(read, f"read the footer of {uri}")


def seal(output: str, storage_options: dict | None, entry: dict[str, Any], keep: list[tuple[str, list[tuple[int, int]]]],
         total: int, stride: int, schema: bytes, lease_owner: str | None = None) -> dict[str, Any]:
    """Merge a complete shard's slices into its file (``entry``: the manifest entry without
    counts; ``keep``: each slice's ranges to keep; ``stride``: row ids are ``shard * stride
    + index``; ``schema``: the data columns' Arrow schema, serialized). Returns the entry with its counts. Idempotent: a shard whose file
    exists is read back, so a retried task does no harm.

    Raises:
        RuntimeError: the slices do not hold every row of the shard exactly once.
    """
    from .lease import assert_held

    shard_uri = storage.join(output, entry["parts"][0]["path"])
    got = shard_stats(shard_uri, storage_options)
    if got is None:
        if lease_owner is not None:
            assert_held(output, storage_options, lease_owner)
        got = _merge_slices(output, storage_options, entry, keep, total, stride, pa.ipc.read_schema(pa.py_buffer(schema)))
    folder = storage.join(output, stage_dir(int(entry["shard"])))
    if storage.exists(folder, storage_options):
        fs, path = storage.filesystem(folder, storage_options)
        storage.retrying(lambda: fs.rm(path, recursive=True), f"delete {folder}")
    return _entry(entry, got)


def _entry(entry: dict[str, Any], stats: dict[str, Any]) -> dict[str, Any]:
    part = {**entry["parts"][0], "rows": stats["rows"], "bytes": stats["bytes"], "node": stats.get("node") or None}
    return {**entry, "rows": stats["rows"], "errors": stats["errors"], "bytes": stats["bytes"], "parts": [part],
            "errors_path": entry.get("errors_path") if stats["errors"] else None,
            "label_max": stats.get("label_max", -1), "nodes": stats.get("nodes") or entry.get("nodes") or []}


def _merge_slices(output: str, storage_options: dict | None, entry: dict[str, Any],
                  keep: list[tuple[str, list[tuple[int, int]]]], total: int, stride: int,
                  schema: pa.Schema) -> dict[str, Any]:
    base = int(entry["shard"]) * int(stride)
    folder = storage.join(output, stage_dir(int(entry["shard"])))
    out = _ShardFile(storage.join(output, entry["parts"][0]["path"]), storage_options, schema)
    try:
        errors, rows, label_max, seen = [], 0, -1, 0
        for key, ranges in keep:
            want = sum(b - a + 1 for a, b in ranges)
            good = read_table(storage.join(folder, f"{key}.parquet"), storage_options)
            good = good.filter(pa.array(_in_ranges(good.column("row_id").to_numpy() - base, ranges)))
            bad = ERROR_SCHEMA.empty_table()
            if storage.exists(storage.join(folder, f"{key}.errors.parquet"), storage_options):
                bad = read_table(storage.join(folder, f"{key}.errors.parquet"), storage_options)
                bad = bad.filter(pa.array(_in_ranges(bad.column("row_id").to_numpy() - base, ranges)))
            if good.num_rows + bad.num_rows != want:
                raise RuntimeError(f"shard {entry['name']!r}: slice {key} holds {good.num_rows + bad.num_rows} of the "
                                   f"{want} rows it reported")
            out.write(good.cast(schema) if good.schema != schema else good)
            errors.append(bad)
            rows += good.num_rows
            seen += want
            if "label" in good.column_names and good.num_rows:
                label_max = max(label_max, int(np.max(good.column("label").to_numpy())))
        if seen != total:
            raise RuntimeError(f"shard {entry['name']!r} lost rows: its slices hold {seen} of its {total} rows")
        error_table = pa.concat_tables(errors) if errors else ERROR_SCHEMA.empty_table()
        if error_table.num_rows:
            write_table(storage.join(output, entry["errors_path"]), error_table, storage_options)
        stats = {"rows": rows, "errors": error_table.num_rows, "label_max": label_max, "nodes": entry.get("nodes") or [],
                 "node": node_id()}
        return {**stats, "bytes": out.publish(stats)}
    except BaseException:
        out.abort()
        raise


def rewrite(output: str, storage_options: dict | None, old: dict[str, Any], entry: dict[str, Any],
            keep_ids: list[int] | None, label_map: list[int] | None) -> dict[str, Any]:
    """A committed shard written again without model work: only the rows ``keep_ids`` (all:
    None), labels mapped through ``label_map`` (old index -> new; None: unchanged). For
    inputs of which some files are gone, and classes that changed. Idempotent, like
    :func:`seal`."""
    target = storage.join(output, entry["parts"][0]["path"])
    got = shard_stats(target, storage_options)
    if got is None:
        keep = None if keep_ids is None else pa.array(np.asarray(keep_ids, dtype=np.int64))

        def edited(table: pa.Table) -> pa.Table:
            if keep is not None:
                import pyarrow.compute as pc

                table = table.filter(pc.is_in(table.column("row_id"), value_set=keep))
            if label_map is not None and "label" in table.column_names:
                labels = table.column("label").to_numpy()
                mapped = np.asarray(label_map, dtype=np.int32)[np.clip(labels, 0, None)]
                table = table.set_column(table.column_names.index("label"), "label",
                                         pa.array(np.where(labels >= 0, mapped, labels).astype(np.int32)))
            return table

        good = edited(read_table(storage.join(output, old["parts"][0]["path"]), storage_options))
        bad = (edited(read_table(storage.join(output, old["errors_path"]), storage_options)) if old.get("errors_path")
               else ERROR_SCHEMA.empty_table())
        if bad.num_rows:
            write_table(storage.join(output, entry["errors_path"]), bad, storage_options)
        out = _ShardFile(target, storage_options, good.schema.remove_metadata())
        try:
            out.write(good.replace_schema_metadata(None))
            label_max = int(np.max(good.column("label").to_numpy())) if "label" in good.column_names and good.num_rows else -1
            stats = {"rows": good.num_rows, "errors": bad.num_rows, "label_max": label_max,
                     "nodes": old.get("nodes") or [], "node": node_id()}
            got = {**stats, "bytes": out.publish(stats)}
        except BaseException:
            out.abort()
            raise
    return _entry({**entry, "nodes": old.get("nodes") or []}, got)


def errors_of(output: str, manifest: Any, storage_options: dict | None) -> pa.Table:
    """(row_id, path, reason) of every error row a committed version lists, in row-id
    order: each shard's errors file (format 2 and older: their one ``errors.parquet``)."""
    if manifest.errors_file:
        return read_table(storage.join(output, manifest.errors_file), storage_options)
    paths = [s.errors_path for s in manifest.shards if s.errors and s.errors_path]
    with ThreadPoolExecutor(16) as pool:
        tables = list(pool.map(lambda p: read_table(storage.join(output, p), storage_options), paths))
    return pa.concat_tables(tables).sort_by("row_id") if tables else ERROR_SCHEMA.empty_table()


def done_shards(output: str, storage_options: dict | None, entries: Iterable[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Of the planned ``entries``, those whose shard file exists (an earlier run of the same
    plan sealed them), with their counts read from the files' footers."""
    entries = list(entries)
    folder = storage.join(output, "shards")
    if not entries or not storage.exists(folder, storage_options):
        return {}
    fs, root = storage.filesystem(folder, storage_options)
    names = set(storage.retrying(lambda: [p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False, refresh=True)],
                                 f"list {folder}"))
    present = [e for e in entries if e["parts"][0]["path"].rsplit("/", 1)[-1] in names]

    def stats(e: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
        return int(e["shard"]), shard_stats(storage.join(output, e["parts"][0]["path"]), storage_options)

    with ThreadPoolExecutor(16) as pool:
        found = dict(pool.map(stats, present))
    return {e["shard"]: _entry(e, found[int(e["shard"])]) for e in present if found.get(int(e["shard"]))}  # type: ignore[arg-type]


def _version_name(n: int) -> str:
    return f"{VERSIONS}/{n:08d}.json"


def latest(output: str, storage_options: dict | None) -> dict[str, Any] | None:
    """The newest committed version's manifest, as data (None: nothing committed).
    ``manifest.json`` is its copy; a commit whose copy was not written yet (the committing
    job died in between) is found in ``_versions/``."""
    data = read_json(storage.join(output, MANIFEST), storage_options)
    folder = storage.join(output, VERSIONS)
    if not storage.exists(folder, storage_options):
        return data
    fs, root = storage.filesystem(folder, storage_options)
    names = storage.retrying(lambda: fs.ls(root, detail=False, refresh=True), f"list {folder}")
    numbers = sorted(int(n.rsplit("/", 1)[-1][:-5]) for n in names if n.endswith(".json") and n.rsplit("/", 1)[-1][:-5].isdigit())
    if numbers and (data is None or int(data.get("version") or 1) < numbers[-1]):
        return read_json(storage.join(output, _version_name(numbers[-1])), storage_options)
    return data


def commit_version(output: str, manifest: Any, storage_options: dict | None, what: str) -> None:
    """The commit: version ``manifest.version`` is created, never overwritten, so two jobs
    cannot both commit; then ``manifest.json`` becomes its copy.

    Raises:
        FileExistsError: another job committed this version first.
    """
    body = json.dumps(manifest.to_dict(), indent=2, sort_keys=True).encode()
    try:
        storage.create_bytes(storage.join(output, _version_name(manifest.version)), body, storage_options)
    except FileExistsError:
        raise FileExistsError(f"another job committed version {manifest.version} of the {what} at {output!r} first; "
                              "this run's shards were not committed") from None
    storage.write_bytes(storage.join(output, MANIFEST), body, storage_options)


def clean(output: str, storage_options: dict | None, keep: Iterable[dict[str, Any] | None]) -> int:
    """Delete what no version in ``keep`` (manifests as data) lists: superseded and unfinished
    shards, errors and input lists, the staging area, the attempt record and older version
    records. Returns the number of files deleted."""
    listed: set[str] = set()
    versions: set[str] = set()
    for data in keep:
        if data is not None:
            m = parse_manifest(data)
            listed |= m.files()
            versions.add(_version_name(m.version))
    fs, root = storage.filesystem(output, storage_options)
    root = root.rstrip("/")
    deleted = 0
    for folder in ("shards", "errors", INPUTS, VERSIONS):
        if not storage.exists(storage.join(output, folder), storage_options):
            continue
        names = storage.retrying(lambda: fs.ls(f"{root}/{folder}", detail=False, refresh=True), f"list {output}/{folder}")
        for name in names:
            rel = f"{folder}/{name.rsplit('/', 1)[-1]}"
            if rel not in listed and rel not in versions:
                deleted += storage.delete(storage.join(output, rel), storage_options)
    if storage.exists(storage.join(output, STAGING), storage_options):
        storage.retrying(lambda: fs.rm(f"{root}/{STAGING}", recursive=True), f"delete {output}/{STAGING}")
    storage.delete(storage.join(output, ATTEMPT), storage_options)
    return deleted
