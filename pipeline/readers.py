"""Rows out of image sources, read in Ray tasks: tar shards, Parquet files with image
bytes, manifest fragments and loose files, decoded and resized there (or left as bytes
for the model actors to decode on their GPU).

Every row carries where it comes from: ``shard`` (the planned shard's number), ``index``
(its position in the shard: a tar's sample order, a Parquet file's row, a manifest's or a
file list's position), ``row_id = shard * stride + index`` (stable across runs), and
``last`` (True on the shard's final row, so whoever counts rows knows when a shard is
complete without the driver ever listing them). A shard with no rows yields one marker row
(``index = -1``, ``error = NO_ROWS``) that carries nothing but its ``last``.

Bad data is an error row, never a failed job: an image that does not decode, a sample
without an image, a label that does not parse, and a tar truncated mid-member (the rows
before the cut are kept; the cut is one error row naming the shard). Storage that is down
is not bad data: reads are retried (:func:`freezeray.storage.retrying`) and a tar stream cut
by a transient error is reopened and resumed after the samples already read.

Ray Data's own ``read_webdataset`` is not used: it raises on a truncated tar or a bad
image (failing the job) and knows neither a sample's position in its shard nor the
shard's end, which incremental runs and exactly-once commits are built on.
"""

from __future__ import annotations

import io
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa

from freezeray import storage
from freezeray.images import MAX_IMAGE_PIXELS, PreprocessConfig, preprocess_bytes

from .formats import Cut, ImageSource, ReadOptions, parse_label, resolve_paths, sample_label, samples

__all__ = ["ReadSpec", "shard_rows", "file_rows", "readable", "NO_ROWS", "ROW_COLUMNS",
           "decode_memory", "read_all", "row_side", "rows_dataset", "source_rows", "image_dataset",
           "augment_source_config", "SOURCE_STRIDE"]

SOURCE_STRIDE = 1 << 32  # row ids of input shards read without an output plan: shard << 32 | index

NO_ROWS = "(marker: this shard has no rows)"
ROW_COLUMNS = ("row_id", "path", "label", "shard", "index", "last", "error")


def readable(errors: Sequence[str]) -> np.ndarray:
    """Mask of the rows whose ``error`` is empty: the file was read and decoded."""
    return np.asarray([e == "" for e in errors], dtype=bool)


@dataclass(frozen=True)
class ReadSpec:
    """What a read task needs (crosses the Ray boundary as a dict)."""

    storage_options: dict[str, Any] | None  # never logged
    preprocessing: dict[str, Any] | None  # PreprocessConfig.to_dict(); None: leave the bytes undecoded ("data")
    stride: int  # row_id = shard * stride + index
    batch_size: int = 32  # rows decoded and yielded at a time
    max_pixels: int | None = MAX_IMAGE_PIXELS
    options: dict[str, Any] | None = None  # ReadOptions.to_dict()
    classes: tuple[str, ...] = ()  # for labels that are class names
    root: str = ""  # manifests may only name files under it
    split: tuple[str, float, int] | None = None  # (side, fraction, seed): only the rows on that side (row_side)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["classes"] = list(self.classes)
        d["split"] = list(self.split) if self.split else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ReadSpec":
        split = d.get("split")
        return cls(**{**d, "classes": tuple(d.get("classes") or ()), "split": tuple(split) if split else None})

    @property
    def read_options(self) -> ReadOptions:
        return ReadOptions.from_dict(self.options or {})


class _Rows:
    """Collects rows of one shard and hands them out as batches, holding the newest back
    so that the shard's final row can be marked ``last``."""

    def __init__(self, spec: ReadSpec, shard: int) -> None:
        self.spec, self.shard = spec, shard
        self.config = PreprocessConfig.from_dict(spec.preprocessing) if spec.preprocessing else None
        self.rows: list[tuple[int, str, int, str, Any]] = []  # (index, path, label, error, payload)
        self.held: dict[str, np.ndarray] | None = None

    def add(self, index: int, path: str, label: int, error: str, payload: Any) -> Iterator[dict[str, np.ndarray]]:
        """``payload``: the image's bytes (None with an error)."""
        if self.spec.split is not None:
            side, fraction, seed = self.spec.split
            if not row_side(np.asarray([self.shard * self.spec.stride + index]), fraction, seed, side)[0]:
                return  # the other side of a train/validation split
        self.rows.append((index, path, label, error, payload))
        if len(self.rows) >= self.spec.batch_size:
            yield from self._flush()

    def _flush(self) -> Iterator[dict[str, np.ndarray]]:
        if not self.rows:
            return
        batch = self._batch(self.rows)
        self.rows = []
        if self.held is not None:
            yield self.held
        self.held = batch

    def finish(self, uri: str) -> Iterator[dict[str, np.ndarray]]:
        yield from self._flush()
        if self.held is None:  # no rows at all: a marker carries the shard's end
            self.held = self._batch([(-1, uri, -1, NO_ROWS, None)])
        self.held["last"][-1] = True
        yield self.held
        self.held = None

    def _batch(self, rows: list[tuple[int, str, int, str, Any]]) -> dict[str, np.ndarray]:
        n = len(rows)
        index = np.asarray([r[0] for r in rows], dtype=np.int64)
        errors = [r[3] for r in rows]
        payloads = [r[4] for r in rows]
        out = {
            "row_id": np.where(index >= 0, self.shard * self.spec.stride + index, -1).astype(np.int64),
            "path": np.asarray([r[1] for r in rows], dtype=object),
            "label": np.asarray([r[2] for r in rows], dtype=np.int32),
            "shard": np.full(n, self.shard, dtype=np.int64),
            "index": index,
            "last": np.zeros(n, dtype=bool),
        }
        out.update(decode_payloads(payloads, errors, self.config, self.spec.max_pixels))
        return out


def decode_payloads(payloads: list[Any], errors: list[str], config: PreprocessConfig | None,
                    max_pixels: int | None) -> dict[str, np.ndarray]:
    """Image bytes -> ``pixels`` (uint8 (N, H, W, C)) and ``error`` per row; with no
    ``config``, the bytes themselves as ``data``. A row that fails to decode gets its reason."""
    errors = list(errors)
    n = len(payloads)
    if config is None:
        data = np.empty(n, dtype=object)
        data[:] = [bytes(p) if isinstance(p, (bytes, bytearray, memoryview)) and not e else b""
                   for p, e in zip(payloads, errors)]
        return {"data": data, "error": np.asarray(errors, dtype=object)}
    c, h, w = config.input_size
    pixels = np.zeros((n, h, w, c), dtype=np.uint8)
    for i, blob in enumerate(payloads):
        if errors[i]:
            continue
        try:
            pixels[i] = preprocess_bytes(blob, config, max_pixels).reshape(h, w, c)
        except Exception as exc:  # a bad file is an error row, never a failed job
            errors[i] = str(exc) or type(exc).__name__
    return {"pixels": pixels, "error": np.asarray(errors, dtype=object)}


def row_side(row_ids: np.ndarray, fraction: float, seed: int, side: str) -> np.ndarray:
    """Mask of the rows on one side of a seeded train/validation split by row id (the same
    row always lands on the same side, whatever the batching): ``fraction`` of the rows are
    on ``"validation"``, the rest on ``"train"``."""
    ids = np.asarray(row_ids).astype(np.uint64)
    with np.errstate(over="ignore"):
        h = ids * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed) * np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(31)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(29)
    u = (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return (u < fraction) if side == "validation" else (u >= fraction)


# ---------------------------------------------------------------------------------------
# loose files: one row per file (the driver listed them)


def read_all(paths: list[str], storage_options: dict[str, Any] | None) -> list[bytes | Exception]:
    """Each file's bytes, or the exception that reading it raised (missing, denied, a
    directory). Transient errors are retried for the whole batch, then raised."""
    if not paths:
        return []
    fs, _ = storage.filesystem(paths[0], storage_options)
    stripped = [fs._strip_protocol(p) for p in paths]  # fsspec's own URI -> path rule
    got: dict[str, Any] = {}

    def fetch() -> None:
        todo = [p for p in dict.fromkeys(stripped) if p not in got or _retry(got[p])]
        got.update(_cat(fs, todo))
        failing = [got[p] for p in todo if _retry(got.get(p))]
        if failing:
            raise failing[0]

    storage.retrying(fetch, f"read {len(paths)} images (first {paths[0]})")
    return [got.get(p, FileNotFoundError(p)) for p in stripped]


def _retry(value: Any) -> bool:
    return isinstance(value, Exception) and storage.is_transient(value)


def _cat(fs: Any, paths: list[str]) -> dict[str, Any]:
    try:
        got = fs.cat(paths, on_error="return")  # async filesystems (s3fs, gcsfs) fetch these concurrently
    except Exception:  # some filesystems lack on_error: one file at a time
        got = {}
        for p in paths:
            try:
                got[p] = fs.cat_file(p)
            except Exception as exc:
                got[p] = exc
    if not isinstance(got, dict):
        got = {paths[0]: got}
    return got


def _files_payloads(paths: list[str], errors: list[str], storage_options: dict | None) -> tuple[list[Any], list[str]]:
    errors = list(errors)
    todo = [i for i in range(len(paths)) if not errors[i]]
    payloads: list[Any] = [None] * len(paths)
    for i, blob in zip(todo, read_all([paths[i] for i in todo], storage_options)):
        if isinstance(blob, Exception):
            errors[i] = f"cannot read: {type(blob).__name__}: {blob}"
        else:
            payloads[i] = blob
    return payloads, errors


def file_rows(batch: dict[str, np.ndarray], spec: dict[str, Any]) -> dict[str, np.ndarray]:
    """Ray Data batch function over listed loose files (``ROW_COLUMNS``): each file read
    and decoded (``pixels``), or read only (``data``). A file that cannot be read or decoded
    becomes an error row; storage that stays down fails the batch, so no good image is ever
    recorded as an error. Images over ``max_pixels`` are refused from their header."""
    s = ReadSpec.from_dict(spec)
    paths = [str(p) for p in batch["path"]]
    payloads, errors = _files_payloads(paths, [str(e) for e in batch["error"]], s.storage_options)
    config = PreprocessConfig.from_dict(s.preprocessing) if s.preprocessing else None
    out = {k: v for k, v in batch.items() if k not in ("size", "version")}
    out.update(decode_payloads(payloads, errors, config, s.max_pixels))
    return out


def decode_memory(config: PreprocessConfig | None, batch_size: int) -> int:
    """Bytes a read task needs: its worker process (about 0.5 GB) plus one batch of decoded
    images (taken as twice the resized size) and the uint8 pixels it returns. Declaring it
    to Ray as the task's ``memory`` also keeps Ray Data from fusing the read stage into the
    model actors that follow (their remote arguments differ), so decoding runs in its own
    tasks."""
    if config is None:
        return 512 * 2**20
    c, h, w = config.input_size
    per_image = (config.resize_size ** 2) * c * 2 + h * w * c
    return int(512 * 2**20 + batch_size * per_image)


# ---------------------------------------------------------------------------------------
# sharded inputs: one task per input shard, rows yielded as they are read


def shard_rows(batch: dict[str, np.ndarray], spec: dict[str, Any]) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data batch function: each row of ``batch`` names an input shard (``shard``,
    ``kind``, ``uri``); yields its rows in order, decoded, the last one marked."""
    s = ReadSpec.from_dict(spec)
    for shard, kind, uri in zip(batch["shard"], batch["kind"], batch["uri"]):
        rows = _Rows(s, int(shard))
        reader = {"tar": _tar_rows, "parquet": _parquet_rows, "manifest": _manifest_rows}[str(kind)]
        yield from reader(str(uri), s, rows)
        yield from rows.finish(str(uri))


def _tar_rows(uri: str, spec: ReadSpec, rows: _Rows) -> Iterator[dict[str, np.ndarray]]:
    """The samples of a tar shard, streamed. A transient storage error reopens the stream and
    skips the samples already read (within the retry window); a cut file ends the shard
    with an error row naming it."""
    opts = spec.read_options
    image_keys = (opts.image_key,) if opts.image_key else ("jpg", "jpeg", "png", "webp")
    fs, path = storage.filesystem(uri, spec.storage_options)
    done, started, delay = 0, time.monotonic(), 0.5
    while True:
        seen = 0
        try:
            with fs.open(path, "rb", block_size=8 << 20) as f:
                for key, parts in samples(f, int(fs.size(path))):
                    seen += 1
                    if seen <= done:
                        continue
                    name = f"{uri}#{key}"
                    image = next((parts[k] for k in image_keys if k in parts), None)
                    label, why = sample_label(parts, opts, spec.classes)
                    if image is None:
                        why = f"sample has no image member ({'/'.join(image_keys)}); it has {', '.join(sorted(parts))}"
                    done += 1
                    yield from rows.add(done - 1, name, label, why, image)
            return
        except Cut as cut:
            yield from rows.add(done, uri, -1, f"truncated tar: {cut}; the {done} samples before the cut are kept", None)
            return
        except Exception as exc:
            if not storage.is_transient(exc) or time.monotonic() - started + delay > storage.retry_seconds():
                if storage.is_transient(exc):
                    raise storage.StorageUnavailable(f"storage unavailable while reading {uri} ({exc})") from exc
                raise
            time.sleep(delay)
            delay = min(10.0, delay * 2)


def _parquet_rows(uri: str, spec: ReadSpec, rows: _Rows) -> Iterator[dict[str, np.ndarray]]:
    """The rows of a Parquet file with image bytes, one batch of rows at a time."""
    import pyarrow.parquet as pq

    opts = spec.read_options
    columns = [c for c in (opts.image_key, opts.label_key) if c]
    fs, path = storage.filesystem(uri, spec.storage_options)
    done = 0
    with storage.retrying(lambda: fs.open(path, "rb"), f"open {uri}") as f:
        parquet = pq.ParquetFile(f)
        for group in range(parquet.num_row_groups):
            table = storage.retrying(lambda: parquet.read_row_group(group, columns=columns), f"read {uri}")
            images = table.column(opts.image_key).combine_chunks()
            if hasattr(images.type, "num_fields"):  # the Hugging Face Image struct {bytes, path}
                names = [images.type.field(i).name for i in range(images.type.num_fields)]
                refs = images.field("path").to_pylist() if "path" in names else [None] * len(images)
                images = images.field("bytes")
            else:
                refs = [None] * len(images)
            blobs = images.to_pylist()
            labels = table.column(opts.label_key).to_pylist() if opts.label_key else [None] * len(blobs)
            for blob, ref, raw in zip(blobs, refs, labels):
                label, why = parse_label(raw, opts, spec.classes) if opts.label_key else (-1, "")
                if blob is None:
                    why = (f"no image bytes (the image is only referenced, as {ref!r})" if ref else "no image bytes")
                done += 1
                yield from rows.add(done - 1, f"{uri}#{done - 1}", label, why, blob)


def _manifest_rows(uri: str, spec: ReadSpec, rows: _Rows) -> Iterator[dict[str, np.ndarray]]:
    """The files a manifest fragment lists, read ``batch_size`` at a time."""
    import pyarrow.parquet as pq

    opts = spec.read_options
    table = pq.read_table(io.BytesIO(storage.read_bytes(uri, spec.storage_options)))
    paths = resolve_paths(table.column("path").to_pylist(), uri, spec.root, opts.allow_outside)
    raw = table.column("label").to_pylist() if opts.label_key and "label" in table.column_names else [None] * len(paths)
    step = spec.batch_size
    for start in range(0, len(paths), step):
        chunk = paths[start:start + step]
        labels = [(parse_label(v, opts, spec.classes) if opts.label_key else (-1, "")) for v in raw[start:start + step]]
        payloads, errors = _files_payloads(chunk, [why for _, why in labels], spec.storage_options)
        for i, (p, payload, error) in enumerate(zip(chunk, payloads, errors)):
            yield from rows.add(start + i, p, labels[i][0], error, payload)


# ---------------------------------------------------------------------------------------
# the Ray datasets of rows (Ray is imported when one is built, not by the read tasks)


def rows_dataset(src: ImageSource, shards: list[tuple[int, Any]], spec: ReadSpec, num_cpus: float,
                 memory: int, rows_per_block: int) -> Any:
    """The rows of these shards of ``src`` as a Ray Dataset (:data:`~pipeline.readers.ROW_COLUMNS`
    plus ``pixels`` or ``data``), read in Ray tasks: ``(number, InputShard)`` pairs one task
    per input shard, ``(number, members)`` pairs (loose files: a shard's list) in blocks of
    ``rows_per_block`` files."""
    import ray.data

    if src.sharded:
        items = [{"shard": n, "kind": s.kind, "uri": s.uri} for n, s in shards]
        ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
        return ds.map_batches(shard_rows, batch_size=1, batch_format="numpy", fn_kwargs={"spec": spec.to_dict()},
                              num_cpus=num_cpus, memory=memory, **_worker_env())
    tables = []
    names = {c: i for i, c in enumerate(src.classes)}
    for number, members in shards:
        index = members.column("index").to_numpy()
        labels = [names.get(v, -1) if v else -1 for v in members.column("label").to_pylist()]
        tables.append(pa.table({
            "row_id": pa.array(number * spec.stride + index), "path": members.column("path"),
            "label": pa.array(labels, pa.int32()), "shard": pa.array(np.full(len(index), number, dtype=np.int64)),
            "index": pa.array(index), "last": pa.array(index == index.max() if len(index) else np.zeros(0, bool)),
            "error": members.column("error")}))
    return _files_dataset(pa.concat_tables(tables), spec, num_cpus, memory, rows_per_block)


def _worker_env() -> dict[str, Any]:
    from .runtime import worker_env  # on the driver only (it imports Ray)

    return worker_env()


def _files_dataset(table: pa.Table, spec: ReadSpec, num_cpus: float, memory: int, rows_per_block: int) -> Any:
    """Listed loose files (``ROW_COLUMNS``) read by :func:`file_rows` in tasks of their own,
    from blocks of ``rows_per_block`` rows (so that the tasks run in parallel from the start)."""
    import ray.data

    chunk = max(1, rows_per_block)
    ds = ray.data.from_arrow([table.slice(i, chunk) for i in range(0, table.num_rows, chunk)])
    return ds.map_batches(file_rows, batch_size=spec.batch_size, batch_format="numpy", fn_kwargs={"spec": spec.to_dict()},
                          num_cpus=num_cpus, memory=memory, **_worker_env())


def source_rows(src: ImageSource, config: PreprocessConfig | None, batch_size: int = 32, num_cpus: float = 1.0,
                split: tuple[str, float, int] | None = None) -> Any:
    """Every row of ``src`` as a Ray Dataset (decoded with ``config``; None: bytes), for
    steps that read a source without writing an output (evaluate, fine-tuning): input
    shards are numbered in order (``row_id = shard << 32 | index``); loose files keep their
    listing's row ids. ``split``: only one side of a train/validation split (row_side)."""
    spec = ReadSpec(src.storage_options, config.to_dict() if config else None, SOURCE_STRIDE, batch_size,
                    options=src.options.to_dict(), classes=tuple(src.classes), root=src.root, split=split)
    memory = decode_memory(config, batch_size)
    if src.sharded:
        return rows_dataset(src, list(enumerate(src.shards)), spec, num_cpus, memory, 4 * batch_size)
    files = src.files
    assert files is not None
    ids = files.column("row_id").to_numpy()
    if split is not None:
        files = files.filter(pa.array(row_side(ids, split[1], split[2], split[0])))
        ids = files.column("row_id").to_numpy()
    table = pa.table({"row_id": pa.array(ids), "path": files.column("path"), "label": files.column("label"),
                      "shard": pa.array(np.zeros(len(ids), np.int64)), "index": pa.array(ids),
                      "last": pa.array(np.zeros(len(ids), bool)), "error": files.column("error")})
    return _files_dataset(table, replace(spec, split=None), num_cpus, memory, 4 * batch_size)


def _drop_errors(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    ok = readable(batch["error"])
    return {k: np.asarray(v)[ok] for k, v in batch.items() if k in ("row_id", "label", "pixels")}


def image_dataset(src: ImageSource, config: PreprocessConfig, decode_batch_size: int = 32,
                  split: tuple[str, float, int] | None = None) -> Any:
    """Decoded, preprocessed images of ``src`` as a Ray Dataset (row_id, label, pixels) for
    training (``config``: see :func:`augment_source_config` for augmented training);
    unreadable files are left out (``evaluate``/``predict`` report them)."""
    return source_rows(src, config, decode_batch_size, split=split).map_batches(_drop_errors, batch_format="numpy")


def augment_source_config(config: PreprocessConfig) -> PreprocessConfig:
    """What the decoders make for augmented training: the shorter side resized to
    ``config.resize_size`` and the centre square cut (256 x 256 for a 224-px model), from
    which the training function draws its random crops every epoch."""
    side = config.resize_size
    return replace(config, input_size=(config.input_size[0], side, side), crop_pct=1.0)
