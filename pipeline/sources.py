"""Image sources: an ImageFolder tree or a ``path,label`` manifest on any fsspec
filesystem, listed once on the driver into a table of (row id, path, label).

* ImageFolder: ``root/<class>/<file>``; the label is the class folder, classes are the
  sorted folder names (as torchvision's ``ImageFolder``). Files whose extension is not an
  image extension are skipped, as torchvision does; files directly under the root are
  skipped with a warning. Hidden files and folders (``.ipynb_checkpoints``, ``.DS_Store``)
  are skipped. A class folder with no image in it is an error, as in torchvision, unless
  ``allow_empty=True`` (then it stays a class, with no rows).
* Manifest: a Parquet or CSV file with a ``path`` column and an optional ``label``
  column (class names, or integer class indices). Relative paths are relative to the
  manifest's folder, and every path must stay inside that folder: ``../``, absolute paths
  and URIs elsewhere (another bucket) are refused unless ``allow_outside=True``, so a
  manifest someone else wrote cannot make a job read files it was not pointed at. Classes
  are the sorted distinct names, or ``0..max`` for integers, unless given.

A file whose name is not valid UTF-8 (possible on local disks) cannot be stored in Parquet
or JSON as it is: it is listed as an error row (its name shown with ``\\x`` escapes), never
dropped. Row ids follow the listing order (sorted by path for folders, file order for
manifests), so the same input always gets the same ids.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from surgery import storage
from surgery.preprocess import (
    MAX_IMAGE_PIXELS,
    PreprocessConfig,
    decode_image,
    resize_crop,
)

__all__ = ["ImageSource", "read_images", "IMAGE_EXTENSIONS", "read_and_decode", "read_files", "decode_memory",
           "decode_dataset", "bytes_dataset", "readable", "image_dataset", "augment_source_config"]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass(frozen=True)
class ImageSource:
    """A listed image set: one row per image with a stable row id."""

    uri: str  # the folder or manifest it was listed from
    # columns: row_id (int64), path (full URI), label (int32, -1: none), size (int64, -1: unknown), error (str, "": fine)
    table: pa.Table = field(repr=False)
    classes: tuple[str, ...]  # class names by label index
    layout: str  # "folder" or "manifest"
    storage_options: dict[str, Any] | None = field(default=None, repr=False, compare=False)  # never logged

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def paths(self) -> list[str]:
        return self.table.column("path").to_pylist()

    @property
    def labels(self) -> np.ndarray:
        return self.table.column("label").to_numpy()

    @property
    def labeled(self) -> bool:
        return bool(len(self)) and bool((self.labels >= 0).all())

    def listing_hash(self) -> str:
        """Hash of (path, label, size) for every row: changes when the input set changes."""
        h = hashlib.sha256(b"freezeray.listing/1\n")
        h.update("\n".join(self.classes).encode())
        for col in ("path", "label", "size"):
            arr = self.table.column(col).combine_chunks()
            if col == "path":
                h.update("\n".join(arr.to_pylist()).encode())
            else:
                h.update(np.ascontiguousarray(arr.to_numpy(zero_copy_only=False)).tobytes())
        return h.hexdigest()[:32]

    def subset(self, rows: np.ndarray) -> "ImageSource":
        """The rows at positions ``rows`` (row ids are kept)."""
        return ImageSource(self.uri, self.table.take(pa.array(rows)), self.classes, self.layout, self.storage_options)


def read_images(
    source: str,
    storage_options: dict[str, Any] | None = None,
    *,
    classes: Sequence[str] | None = None,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    allow_empty: bool = False,
    allow_outside: bool = False,
) -> ImageSource:
    """List an image set: an ImageFolder tree, or a ``.parquet``/``.csv`` manifest.

    Args:
        source: a folder or manifest URI (local path, ``file://``, ``s3://``, ``gs://``,
            ``memory://``, ...). A ``memory://`` filesystem lives in one process: it
            can be listed here, but Ray workers in other processes cannot read from it.
        storage_options: fsspec options (endpoint, credentials) for ``source``.
        classes: class names in label order, to fix the mapping (e.g. the training
            set's classes for a test set that lacks some of them).
        extensions: file extensions that count as images in a folder.
        allow_empty: keep class folders that hold no image (as classes with no rows)
            instead of refusing them.
        allow_outside: let a manifest list files outside its own folder.

    Raises:
        FileNotFoundError: nothing at ``source``, or class folders with no images.
        ValueError: an empty set, labels outside ``classes``, or manifest paths outside
            the manifest's folder.

    Example:
        >>> src = read_images("s3://bucket/flowers/train", {"key": ..., "secret": ...})
        >>> len(src), src.classes
    """
    fs, root = storage.filesystem(source, storage_options)
    if not storage.exists(source, storage_options):
        raise FileNotFoundError(f"image source {source!r} does not exist")
    if fs.isfile(root):
        if not root.lower().endswith((".parquet", ".csv")):
            raise ValueError(f"{source!r} is a file but not a .parquet or .csv manifest")
        return _from_manifest(source, fs, root, storage_options, classes, allow_outside)
    return _from_folder(source, fs, root, storage_options, classes, tuple(e.lower() for e in extensions), allow_empty)


def _full_uri(source: str, fs: Any, path: str) -> str:
    """A path returned by ``fs`` as a URI that fsspec opens with the same options."""
    if "://" in source and not source.startswith("file://"):
        protocol = source.split("://", 1)[0]
        return f"{protocol}://{path}"
    return path


def _utf8_problem(path: str) -> str:
    """"" when ``path`` is valid UTF-8, else the reason (local names with undecodable bytes
    arrive as lone surrogates)."""
    try:
        path.encode("utf-8")
        return ""
    except UnicodeEncodeError:
        return "file name is not valid UTF-8 (shown with \\x escapes); rename the file to featurize it"


def _printable(path: str) -> str:
    """``path`` with undecodable bytes as ``\\xNN`` escapes (valid UTF-8, for Parquet)."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _from_folder(source: str, fs: Any, root: str, storage_options: dict | None, classes: Sequence[str] | None,
                 extensions: tuple[str, ...], allow_empty: bool) -> ImageSource:
    found = storage.retrying(lambda: fs.find(root, detail=True, withdirs=True), f"list {source}")
    rows: list[tuple[str, str, int]] = []
    folders: set[str] = set()
    stray = skipped = 0
    root = root.rstrip("/")
    for path, detail in sorted(found.items()):
        rel = path[len(root):].strip("/")
        if not rel:
            continue
        parts = rel.split("/")
        if any(part.startswith(".") for part in parts):
            continue  # hidden files and folders
        if detail.get("type") == "directory":
            if len(parts) == 1:
                folders.add(parts[0])
            continue
        if len(parts) >= 2:
            folders.add(parts[0])
        if not parts[-1].lower().endswith(extensions):
            skipped += 1
            continue
        if len(parts) < 2:
            stray += 1
            continue
        rows.append((_full_uri(source, fs, path), parts[0], int(detail.get("size") or -1)))
    if stray:
        log.warning("%d image files directly under %s have no class folder and were skipped", stray, source)
    if skipped:
        log.info("%d files under %s do not have an image extension (%s) and were skipped", skipped, source,
                 ", ".join(extensions))
    bad_names = sorted(_printable(f) for f in folders if _utf8_problem(f))
    if bad_names:
        raise ValueError(f"class folder names under {source!r} are not valid UTF-8: {bad_names[:20]}; rename them")
    empty = sorted(folders - {r[1] for r in rows})
    if not rows:
        raise ValueError(f"no images under {source!r}: expected <class>/<image> files with extensions {', '.join(extensions)}")
    if empty and not allow_empty:
        raise FileNotFoundError(
            f"class folders with no image files under {source!r}: {empty[:20]}{' ...' if len(empty) > 20 else ''} "
            f"({len(empty)}). Add images, remove the folders, or pass allow_empty=True to keep them as classes"
        )
    names = sorted(folders) if allow_empty else sorted({r[1] for r in rows})
    mapping = _class_mapping(names, classes, source)
    errors = [_utf8_problem(r[0]) for r in rows]
    table = pa.table({
        "row_id": pa.array(np.arange(len(rows), dtype=np.int64)),
        "path": pa.array([_printable(r[0]) if e else r[0] for r, e in zip(rows, errors)], pa.string()),
        "label": pa.array([mapping[r[1]] for r in rows], pa.int32()),
        "size": pa.array([r[2] for r in rows], pa.int64()),
        "error": pa.array(errors, pa.string()),
    })
    return ImageSource(source, table, tuple(classes) if classes else tuple(names), "folder", storage_options)


def _class_mapping(names: Sequence[str], classes: Sequence[str] | None, source: str) -> dict[str, int]:
    if classes is None:
        return {c: i for i, c in enumerate(names)}
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise ValueError(f"{source!r} has classes {unknown[:10]} that are not in the given classes {list(classes)[:20]}")
    return {c: i for i, c in enumerate(classes)}


def _from_manifest(source: str, fs: Any, path: str, storage_options: dict | None,
                   classes: Sequence[str] | None, allow_outside: bool) -> ImageSource:
    import io

    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    data = storage.read_bytes(source, storage_options)
    table = pq.read_table(io.BytesIO(data)) if path.lower().endswith(".parquet") else pacsv.read_csv(io.BytesIO(data))
    if "path" not in table.column_names:
        raise ValueError(f"manifest {source!r} needs a 'path' column; it has {table.column_names}")
    base = posixpath.dirname(path)
    protocol = source.split("://", 1)[0] if "://" in source and not source.startswith("file://") else None
    paths, outside = [], []
    for i, p in enumerate(table.column("path").to_pylist()):
        if p is None or p == "":
            raise ValueError(f"manifest {source!r} has an empty path in row {i}")
        p = str(p)
        if "://" in p:
            scheme, rest = p.split("://", 1)
            same_store = scheme == protocol or (protocol is None and scheme == "file")
            resolved, full = posixpath.normpath(rest), p
        else:
            same_store = True
            resolved = posixpath.normpath(p if p.startswith("/") else posixpath.join(base, p))
            full = _full_uri(source, fs, resolved)
        if not (same_store and (resolved + "/").startswith(base.rstrip("/") + "/")):
            outside.append((i, p))
        paths.append(full)
    if outside and not allow_outside:
        shown = "; ".join(f"row {i}: {p!r}" for i, p in outside[:5])
        raise ValueError(
            f"manifest {source!r} lists {len(outside)} paths outside its own folder {base!r} ({shown}"
            f"{'; ...' if len(outside) > 5 else ''}); refused so that a manifest cannot point a job at other files. "
            "Move the manifest above the images, or pass allow_outside=True if you trust it"
        )
    n = len(paths)
    if n == 0:
        raise ValueError(f"manifest {source!r} lists no images")
    if "label" in table.column_names:
        raw = table.column("label").to_pylist()
        if any(v is None for v in raw):
            raise ValueError(f"manifest {source!r} has rows without a label")
        if all(isinstance(v, (int, np.integer)) for v in raw):
            top = max(raw)
            names = tuple(classes) if classes else tuple(str(i) for i in range(top + 1))
            bad = sorted({v for v in raw if v < 0 or v >= len(names)})
            if bad:
                raise ValueError(f"manifest {source!r} has labels {bad[:10]} outside 0..{len(names) - 1}")
            labels = np.asarray(raw, dtype=np.int32)
        else:
            raw = [str(v) for v in raw]
            mapping = _class_mapping(sorted(set(raw)), classes, source)
            names = tuple(classes) if classes else tuple(sorted(set(raw)))
            labels = np.asarray([mapping[v] for v in raw], dtype=np.int32)
    else:
        names = tuple(classes or ())
        labels = np.full(n, -1, dtype=np.int32)
    out = pa.table({
        "row_id": pa.array(np.arange(n, dtype=np.int64)),
        "path": pa.array(paths, pa.string()),
        "label": pa.array(labels, pa.int32()),
        "size": pa.array(np.full(n, -1, dtype=np.int64)),
        "error": pa.array([""] * n, pa.string()),
    })
    return ImageSource(source, out, names, "manifest", storage_options)


# ---------------------------------------------------------------------------------------
# the CPU stage: read bytes + decode + resize + crop


def read_and_decode(
    batch: dict[str, np.ndarray],
    preprocessing: dict[str, Any],
    storage_options: dict[str, Any] | None = None,
    max_pixels: int | None = MAX_IMAGE_PIXELS,
) -> dict[str, np.ndarray]:
    """Ray Data batch function: read each ``path`` and turn it into uint8 (H, W, C) pixels.

    A file that cannot be read or decoded becomes an error row (``error`` holds the
    reason, ``pixels`` are zeros), and so does a row the listing already marked (its
    ``error`` column); the batch never fails for one bad file. Storage that is down is
    not a bad file: transient read errors are retried (see :func:`surgery.storage.retrying`)
    and, if they last, fail the batch, so no good image is ever recorded as an error.
    Images over ``max_pixels`` are refused from their header, before decoding. (Training
    augmentation is not done here but in the training function, so that it can differ
    every epoch: see :mod:`surgery.augment`.)
    """
    config = PreprocessConfig.from_dict(preprocessing)
    c, h, w = config.input_size
    paths = [str(p) for p in batch["path"]]
    n = len(paths)
    pixels = np.zeros((n, h, w, c), dtype=np.uint8)
    errors = [str(e) for e in batch["error"]] if "error" in batch else [""] * n
    todo = [i for i in range(n) if not errors[i]]
    blobs = _read_all([paths[i] for i in todo], storage_options)
    for i, blob in zip(todo, blobs):
        if isinstance(blob, Exception):
            errors[i] = f"cannot read: {type(blob).__name__}: {blob}"
            continue
        try:
            img = decode_image(blob, c, max_pixels)
            pixels[i] = resize_crop(img, config).reshape(h, w, c)
        except Exception as exc:  # a bad file is an error row, never a failed job
            errors[i] = str(exc) or type(exc).__name__
    out = {k: v for k, v in batch.items() if k != "size"}
    out["pixels"] = pixels
    out["error"] = np.asarray(errors, dtype=object)
    return out


def read_files(batch: dict[str, np.ndarray], storage_options: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Ray Data batch function: each ``path``'s bytes as ``data``, undecoded (for
    ``decode="gpu"``, where the model actors decode). A file that cannot be read becomes
    an error row; storage that stays down fails the batch, as in :func:`read_and_decode`."""
    paths = [str(p) for p in batch["path"]]
    errors = [str(e) for e in batch["error"]] if "error" in batch else [""] * len(paths)
    todo = [i for i in range(len(paths)) if not errors[i]]
    data = np.empty(len(paths), dtype=object)
    data[:] = [b""] * len(paths)
    for i, blob in zip(todo, _read_all([paths[i] for i in todo], storage_options)):
        if isinstance(blob, Exception):
            errors[i] = f"cannot read: {type(blob).__name__}: {blob}"
        else:
            data[i] = bytes(blob)
    out = {k: v for k, v in batch.items() if k != "size"}
    out["data"] = data
    out["error"] = np.asarray(errors, dtype=object)
    return out


def readable(errors: Sequence[str]) -> np.ndarray:
    """Mask of the rows whose ``error`` is empty: the file was read and decoded."""
    return np.asarray([e == "" for e in errors], dtype=bool)


def decode_dataset(table: pa.Table, config: PreprocessConfig, storage_options: dict[str, Any] | None,
                   batch_size: int = 32, rows_per_block: int | None = None,
                   max_pixels: int | None = MAX_IMAGE_PIXELS, num_cpus: float = 1.0) -> Any:
    """The rows of ``table`` (``row_id``, ``path``, ...) as a Ray Dataset decoded by
    :func:`read_and_decode` in tasks of their own (``num_cpus``, ``decode_memory``), ready for
    a model stage. Blocks of ``rows_per_block`` rows (default: four decode batches) let
    the decode tasks run in parallel from the start."""
    import ray.data

    chunk = max(1, rows_per_block or 4 * batch_size)
    ds = ray.data.from_arrow([table.slice(i, chunk) for i in range(0, table.num_rows, chunk)])
    return ds.map_batches(read_and_decode, batch_size=batch_size, batch_format="numpy",
                          fn_kwargs={"preprocessing": config.to_dict(), "storage_options": storage_options,
                                     "max_pixels": max_pixels},
                          num_cpus=num_cpus, memory=decode_memory(config, batch_size))


def bytes_dataset(table: pa.Table, storage_options: dict[str, Any] | None, batch_size: int = 32,
                  rows_per_block: int | None = None, num_cpus: float = 1.0) -> Any:
    """The rows of ``table`` as a Ray Dataset of undecoded file bytes (``data``), read by
    :func:`read_files` in tasks of their own."""
    import ray.data

    chunk = max(1, rows_per_block or 4 * batch_size)
    ds = ray.data.from_arrow([table.slice(i, chunk) for i in range(0, table.num_rows, chunk)])
    return ds.map_batches(read_files, batch_size=batch_size, batch_format="numpy",
                          fn_kwargs={"storage_options": storage_options}, num_cpus=num_cpus, memory=512 * 2**20)


def _drop_errors(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    ok = readable(batch["error"])
    return {k: np.asarray(v)[ok] for k, v in batch.items() if k not in ("error", "path", "shard")}


def image_dataset(src: ImageSource, config: PreprocessConfig, decode_batch_size: int = 32) -> Any:
    """Decoded, preprocessed images of ``src`` as a Ray Dataset (row_id, label, pixels) for
    training (``config``: see :func:`augment_source_config` for augmented training);
    unreadable files are left out (``evaluate``/``predict`` report them)."""
    ds = decode_dataset(src.table, config, src.storage_options, decode_batch_size)
    return ds.map_batches(_drop_errors, batch_format="numpy")


def augment_source_config(config: PreprocessConfig) -> PreprocessConfig:
    """What the decoders make for augmented training: the shorter side resized to
    ``config.resize_size`` and the centre square cut (256 x 256 for a 224-px model), from
    which the training function draws its random crops every epoch."""
    side = config.resize_size
    return replace(config, input_size=(config.input_size[0], side, side), crop_pct=1.0)


def decode_memory(config: PreprocessConfig, batch_size: int) -> int:
    """Bytes a decode task needs: its worker process (which imports torch through this
    package, about 0.5 GB) plus one batch of decoded images (taken as twice the resized
    size) and the uint8 pixels it returns. Declaring it to Ray as the task's ``memory``
    also keeps Ray Data from fusing the decode stage into the model actors that follow
    (their remote arguments differ), so decoding runs in its own tasks."""
    c, h, w = config.input_size
    per_image = (config.resize_size ** 2) * c * 2 + h * w * c
    return int(512 * 2**20 + batch_size * per_image)


def _read_all(paths: list[str], storage_options: dict[str, Any] | None) -> list[bytes | Exception]:
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
        # async filesystems (s3fs, gcsfs) fetch these concurrently
        got = fs.cat(paths, on_error="return")
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
