"""Planning an output: one output shard per input shard, and for each whether it is kept
from the committed version, computed, or rewritten without model work.

* Sharded inputs (tars, Parquet files, manifest fragments): an input file is one shard,
  identified by its URI, size and ETag/mtime. The same file as in the committed version is
  kept; a new or changed file is computed; a file that is gone drops its shard.
* Loose files (an ImageFolder, one manifest): the files are grouped into shards of
  ``shard_rows`` in listing order, each shard's list kept under ``_inputs/``. On a later
  run, a committed shard whose files are all unchanged (path, size, version, label) is
  kept; one that lost files is rewritten without them (no model work); new and changed
  files are grouped into new shards.

Each planned shard's file is named from its input and a hash of the fingerprint and the
input's identity, so a file that exists holds exactly what the plan asks for: resuming is
looking for files. Shard numbers are kept across versions (a new shard gets the next one),
and row ids are ``shard * stride + index`` (the index in its shard), so a row keeps its id
as long as its input does; on a first run over loose files they are the listing positions.
"""

from __future__ import annotations

import hashlib
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from freezeray import storage

from .manifest import InputRef, Part, Shard
from .shards import INPUTS, read_table
from .sources import ImageSource

__all__ = ["PlannedShard", "Plan", "plan_output", "SHARDED_STRIDE", "label_map"]

SHARDED_STRIDE = 1 << 32  # row ids of sharded inputs: shard << 32 | index (a shard may hold up to 4G rows)
Action = Literal["keep", "compute", "rewrite"]


@dataclass(frozen=True)
class PlannedShard:
    number: int  # row_id = number * stride + index
    name: str  # the input's name (a tar's stem, part-00003 for a group of loose files)
    input: InputRef
    action: Action
    file: str  # shards/<name>-<hash>.parquet
    errors_file: str  # errors/<name>-<hash>.parquet
    total: int | None = None  # rows, when known before reading (loose files)
    kept: Shard | None = None  # keep, rewrite: the committed shard it comes from
    keep_ids: np.ndarray | None = field(default=None, repr=False)  # rewrite: the rows that stay (None: all)
    members: pa.Table | None = field(default=None, repr=False)  # loose files: the list written to _inputs/

    def entry(self) -> dict[str, Any]:
        """Its manifest entry, counts still zero (a seal or rewrite fills them in)."""
        return Shard(shard=self.number, name=self.name, input=self.input, rows=0, errors=0,
                     parts=[Part(path=self.file, rows=0)], errors_path=self.errors_file).to_dict()


@dataclass
class Plan:
    stride: int
    shards: list[PlannedShard]
    dropped: list[Shard]  # committed shards whose input is gone
    label_map: list[int] | None = None  # old label -> new label, when the committed classes differ

    def of(self, action: Action) -> list[PlannedShard]:
        return [s for s in self.shards if s.action == action]

    @property
    def unchanged(self) -> bool:
        return not self.dropped and all(s.action == "keep" for s in self.shards)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", name)[:80] or "shard"


def _hash(*parts: Any) -> str:
    h = hashlib.sha256(b"freezeray.shard/1\n")
    for p in parts:
        h.update(str(p).encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()[:12]


def label_map(old: tuple[str, ...], new: tuple[str, ...]) -> list[int] | None:
    """Old label index -> new one, when ``new`` does not start with ``old`` (None: labels
    stay what they are). Classes of integer labels not known yet (``new`` empty) map to
    themselves."""
    if not new or tuple(new[:len(old)]) == tuple(old):
        return None
    return [new.index(c) if c in new else -1 for c in old]


def plan_output(src: ImageSource, fp: str, committed: Any, shard_rows: int, output: str,
                storage_options: dict[str, Any] | None) -> Plan:
    """What ``output`` needs for ``src`` under fingerprint ``fp``: ``committed`` is its
    current manifest when it has the same fingerprint, else None (everything is computed).
    Sharded sources are planned from their shard list, loose files from the listing and the
    committed shards' input lists (read here, in threads)."""
    stride = committed.stride if committed is not None and committed.stride else (
        SHARDED_STRIDE if src.sharded else max(1, int(shard_rows)))
    remap = label_map(tuple(committed.classes), tuple(src.classes)) if committed is not None else None
    if src.sharded:
        return _plan_sharded(src, fp, committed, stride, remap)
    return _plan_files(src, fp, committed, stride, remap, output, storage_options)


def _files(name: str, h: str) -> tuple[str, str]:
    return f"shards/{name}-{h}.parquet", f"errors/{name}-{h}.parquet"


def _plan_sharded(src: ImageSource, fp: str, committed: Any, stride: int, remap: list[int] | None) -> Plan:
    old = {s.input.uri: s for s in (committed.shards if committed is not None else []) if s.input is not None}
    nxt = max((s.shard for s in committed.shards), default=-1) + 1 if committed is not None else 0
    shards = []
    for shard in src.shards:
        ref = InputRef(uri=shard.uri, kind=shard.kind, size=shard.size, version=shard.version)
        before = old.get(shard.uri)
        number = before.shard if before is not None else nxt
        nxt += before is None
        same_input = before is not None and before.input == ref
        h = _hash(fp, ref.kind, ref.uri, ref.size, ref.version, *(("relabel", *src.classes) if remap else ()))
        name = _safe(shard.name)
        if same_input and remap is None:
            shards.append(PlannedShard(number, before.name, ref, "keep", before.path, before.errors_path or "",
                                       shard.rows, kept=before))
        elif same_input:
            shards.append(PlannedShard(number, name, ref, "rewrite", *_files(name, h), shard.rows, kept=before))
        else:
            shards.append(PlannedShard(number, name, ref, "compute", *_files(name, h), None))
    listed = {s.uri for s in src.shards}
    dropped = [s for uri, s in old.items() if uri not in listed]
    return Plan(stride, shards, dropped, remap)


def _members_hash(fp: str, members: pa.Table, salt: tuple[str, ...] = ()) -> str:
    h = hashlib.sha256(f"freezeray.files/1\n{fp}\n{chr(0).join(salt)}\n".encode())
    for name in ("path", "label", "size", "version", "index", "error"):
        col = members.column(name).combine_chunks()
        if pa.types.is_string(col.type):
            h.update("\0".join(col.to_pylist()).encode("utf-8", "surrogateescape"))
        else:
            h.update(np.ascontiguousarray(col.to_numpy(zero_copy_only=False)).tobytes())
    return h.hexdigest()[:12]


def _listing(src: ImageSource) -> pa.Table:
    """The listing as input-list rows: labels by name (so a list does not depend on class order)."""
    files = src.files
    assert files is not None
    labels = files.column("label").to_numpy()
    names = np.asarray(list(src.classes) + [""], dtype=object)[np.where(labels >= 0, labels, len(src.classes))]
    return pa.table({"path": files.column("path"), "label": pa.array(names.tolist(), pa.string()),
                     "size": files.column("size"), "version": files.column("version"), "error": files.column("error")})


def _new_shard(fp: str, number: int, members: pa.Table, action: Action, kept: Shard | None = None,
               keep_ids: np.ndarray | None = None, salt: tuple[str, ...] = ()) -> PlannedShard:
    name = f"part-{number:05d}"
    h = _members_hash(fp, members, salt)
    ref = InputRef(uri=f"{INPUTS}/{name}-{h}.parquet", kind="files", size=members.num_rows, version=h)
    return PlannedShard(number, name, ref, action, *_files(name, h), members.num_rows, kept=kept, keep_ids=keep_ids,
                        members=members)


def _plan_files(src: ImageSource, fp: str, committed: Any, stride: int, remap: list[int] | None, output: str,
                storage_options: dict[str, Any] | None) -> Plan:
    listing = _listing(src)
    shards: list[PlannedShard] = []
    dropped: list[Shard] = []
    taken = pa.array([], pa.string())
    nxt = 0
    if committed is not None:
        old = [s for s in committed.shards if s.input is not None and s.input.kind == "files"]
        nxt = max((s.shard for s in committed.shards), default=-1) + 1
        lists = _read_lists(output, storage_options, old)
        keys = listing.select(["path", "label", "size", "version"])
        for shard in old:
            members = lists[shard.shard]
            joined = members.join(keys, keys=["path", "label", "size", "version"], join_type="left semi")
            if joined.num_rows == members.num_rows and remap is None:
                shards.append(PlannedShard(shard.shard, shard.name, shard.input, "keep", shard.path,  # type: ignore[arg-type]
                                           shard.errors_path or "", members.num_rows, kept=shard))
            elif joined.num_rows:
                joined = joined.sort_by("index")
                ids = shard.shard * stride + joined.column("index").to_numpy()
                planned = _new_shard(fp, shard.shard, joined, "rewrite", shard,
                                     None if joined.num_rows == members.num_rows else ids,
                                     ("relabel", *src.classes) if remap else ())
                shards.append(planned)
            else:
                dropped.append(shard)
            taken = pa.concat_arrays([taken, joined.column("path").combine_chunks()])
    new = listing.filter(pc.invert(pc.is_in(listing.column("path"), value_set=taken))) if len(taken) else listing
    for start in range(0, new.num_rows, stride):
        chunk = new.slice(start, stride)
        members = chunk.append_column("index", pa.array(np.arange(chunk.num_rows, dtype=np.int64)))
        members = members.select(["path", "label", "size", "version", "index", "error"])
        shards.append(_new_shard(fp, nxt, members, "compute"))
        nxt += 1
    return Plan(stride, shards, dropped, remap)


def _read_lists(output: str, storage_options: dict[str, Any] | None, shards: list[Shard]) -> dict[int, pa.Table]:
    """The committed input lists of loose-file shards, by shard number."""
    def one(s: Shard) -> tuple[int, pa.Table]:
        return s.shard, read_table(storage.join(output, s.input.uri), storage_options)  # type: ignore[union-attr]

    with ThreadPoolExecutor(16) as pool:
        return dict(pool.map(one, shards))
