"""Image sources: what a step is pointed at, recognised and listed on the driver by input
shard, never read there.

Five layouts (``format=`` names them; ``"auto"`` recognises them from the files):

* ``"folder"``: an ImageFolder, ``root/<class>/<file>``; the label is the class folder,
  classes are the sorted folder names (as torchvision's ``ImageFolder``). Files without an
  image extension and files directly under the root are skipped; hidden files and folders,
  and freezeray's own output folders, are skipped. A class folder with no image is an error
  unless ``allow_empty=True``.
* ``"manifest"``: one Parquet or CSV file with a ``path`` column and an optional ``label``
  column (class names or integer indices). Relative paths are relative to the manifest's
  folder, and every path must stay inside it unless ``allow_outside=True``.
* ``"manifests"``: a folder (or glob) of such Parquet manifests, each one an input shard.
* ``"webdataset"``: WebDataset tar shards, as webdataset and img2dataset write them: a
  folder of ``.tar`` files, a glob, a brace range (``s3://b/laion/{00000..41455}.tar``)
  or a list. Members are grouped into samples by key (the name up to the first dot of its
  file name); the image is the first of ``jpg``/``jpeg``/``png``/``webp`` (or
  ``image_key``); the label is ``cls`` (an integer) or ``label_key`` (``txt``, ``cls``, or
  ``json.<field>``); a set without labels is unlabelled.
* ``"parquet"``: Parquet files with the image bytes in a column: the Hugging Face
  ``datasets`` layout (an ``image`` struct ``{bytes, path}``; class names from the
  ``huggingface`` schema metadata of a ``ClassLabel`` column) or a plain binary column
  (``image_key``, or one of ``jpg``/``jpeg``/``png``/``webp``/``image``), from a folder, a
  glob or a list.

Loose files (``folder``, ``manifest``) are listed on the driver: about 150 bytes a file
(a million files, ~150 MB). Sharded layouts (``manifests``, ``webdataset``, ``parquet``)
are listed by shard (a few hundred bytes each, whatever their rows); their rows are read
in Ray tasks (:mod:`pipeline.readers`), so the driver never grows with rows. Past a few
million loose files, write a folder of Parquet manifests or tar/Parquet shards instead.

A file whose name is not valid UTF-8 (possible on local disks) cannot be stored in Parquet
or JSON as it is: it is listed as an error row (its name shown with ``\\x`` escapes), never
dropped.
"""

from __future__ import annotations

import logging
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Literal, Sequence

import numpy as np
import pyarrow as pa

from freezeray import storage

from .formats import (
    WDS_IMAGE_KEYS,
    ImageSource,
    InputShard,
    ReadOptions,
    SourceError,
    class_mapping,
    first_sample,
    hf_class_names,
    image_column,
    label_column,
    parquet_schema,
    read_table,
    resolve_paths,
)

__all__ = ["ImageSource", "InputShard", "ReadOptions", "SourceError", "read_images", "expand_braces",
           "IMAGE_EXTENSIONS", "WDS_IMAGE_KEYS", "Format", "OUTPUT_MARKERS", "printable"]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
# a folder holding one of these is a freezeray output (features, predictions, a run's outputs), never an input
OUTPUT_MARKERS = (".freezeray-output", "_lock.json", "_attempt.json", "_versions")

Format = Literal["auto", "folder", "manifest", "manifests", "webdataset", "parquet"]
_FORMATS = ("auto", "folder", "manifest", "manifests", "webdataset", "parquet")


# ---------------------------------------------------------------------------------------
# recognising a source


def read_images(
    source: str | Sequence[str],
    storage_options: dict[str, Any] | None = None,
    *,
    format: Format = "auto",
    classes: Sequence[str] | None = None,
    image_key: str | None = None,
    label_key: str | None = None,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    allow_empty: bool = False,
    allow_outside: bool = False,
) -> ImageSource:
    """Recognise and list an image set (see the module docstring for the layouts).

    Args:
        source: a folder, a file, a glob (``s3://b/data/train-*.parquet``), a brace range
            (``s3://b/laion/{00000..00999}.tar``) or a list of files, on any fsspec
            filesystem (local, ``file://``, ``s3://``, ``gs://``, ``memory://`` — the last
            lives in one process: Ray workers elsewhere cannot read it).
        storage_options: fsspec options (endpoint, credentials) for ``source``.
        format: ``"auto"`` (recognised from the files) or the layout to read it as.
        classes: class names in label order, to fix the mapping (e.g. the training set's
            classes for a test set that lacks some of them).
        image_key: the tar member extension or Parquet column that holds the image.
        label_key: the tar member (``cls``, ``txt``, ``json.<field>``) or Parquet column
            that holds the label.
        extensions: file extensions that count as images in a folder.
        allow_empty: keep class folders that hold no image (as classes with no rows).
        allow_outside: let a manifest list files outside its own folder.

    Raises:
        FileNotFoundError: nothing at ``source`` (or some of the files it names), or class
            folders with no images.
        SourceError: a source that matches no layout (naming what was looked for), an empty
            set, labels outside ``classes``, manifest paths outside the manifest's folder.

    Example:
        >>> src = read_images("s3://bucket/laion/{00000..00099}.tar", {"key": ..., "secret": ...})
        >>> src.format, len(src.shards)
    """
    if format not in _FORMATS:
        raise SourceError(f"format must be one of {', '.join(_FORMATS)}; got {format!r}")
    options = ReadOptions(image_key=image_key, label_key=label_key, allow_outside=allow_outside)
    classes = tuple(str(c) for c in classes) if classes is not None else None
    if not isinstance(source, str):
        files = _infos(list(source), storage_options)
        return _from_files(_display(list(source)), files, storage_options, format, classes, options)
    if _has_braces(source):
        files = _infos(expand_braces(source), storage_options)
        return _from_files(source, files, storage_options, format, classes, options)
    fs, root = storage.filesystem(source, storage_options)
    if any(c in root for c in "*?["):
        found = storage.retrying(lambda: fs.glob(root, detail=True), f"list {source}")
        files = [(_full_uri(source, p), info) for p, info in sorted(found.items()) if info.get("type") != "directory"]
        if not files:
            raise FileNotFoundError(f"no files match {source!r}")
        return _from_files(source, files, storage_options, format, classes, options)
    if not storage.exists(source, storage_options):
        raise FileNotFoundError(f"image source {source!r} does not exist")
    if storage.retrying(lambda: fs.isfile(root), f"look at {source}"):
        info = storage.retrying(lambda: fs.info(root), f"look at {source}")
        return _from_files(source, [(source, info)], storage_options, format, classes, options)
    return _from_folder(source, fs, root, storage_options, format, classes, options,
                        tuple(e.lower() for e in extensions), allow_empty)


def _display(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{items[0]} (+{len(items) - 1} more)" if items else "[]"


def _has_braces(s: str) -> bool:
    return bool(re.search(r"\{[^{}]*(\.\.|,)[^{}]*\}", s))


def expand_braces(pattern: str) -> list[str]:
    """webdataset's and img2dataset's shard patterns: ``{00000..00999}`` (zero-padded as
    written), ``{a,b,c}``, several braces in one pattern.

    Example:
        >>> expand_braces("s3://b/{000..002}.tar")
        ['s3://b/000.tar', 's3://b/001.tar', 's3://b/002.tar']
    """
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if rng:
        lo, hi = int(rng.group(1)), int(rng.group(2))
        width = len(rng.group(1)) if rng.group(1).startswith("0") else 0
        items = [str(i).zfill(width) for i in (range(lo, hi + 1) if lo <= hi else range(lo, hi - 1, -1))]
    elif "," in body:
        items = body.split(",")
    else:
        items = ["{" + body + "}"]
    return [out for item in items for out in expand_braces(head + item + tail)]


def _full_uri(source: str, path: str) -> str:
    """A path returned by a filesystem as a URI that fsspec opens with the same options."""
    if "://" in source and not source.startswith("file://"):
        protocol = source.split("://", 1)[0]
        return f"{protocol}://{path}"
    return path


def _version(info: dict[str, Any]) -> str:
    """What changes when an object does: its ETag on object stores, else its mtime."""
    for key in ("ETag", "etag", "md5Hash", "mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if value not in (None, ""):
            return str(value).strip('"')
    return ""


def _infos(uris: list[str], storage_options: dict | None) -> list[tuple[str, dict]]:
    """(uri, info) of each file; a missing one is an error naming the first few."""
    if not uris:
        raise SourceError("the list of image files is empty")
    fs, _ = storage.filesystem(uris[0], storage_options)

    def info(uri: str) -> dict | None:
        try:
            return storage.retrying(lambda: fs.info(storage.filesystem(uri, storage_options)[1]), f"look at {uri}")
        except FileNotFoundError:
            return None

    with ThreadPoolExecutor(16) as pool:
        infos = list(pool.map(info, uris))
    missing = [u for u, i in zip(uris, infos) if i is None]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(uris)} files do not exist: {', '.join(missing[:5])}"
                                f"{' ...' if len(missing) > 5 else ''}")
    return [(u, i) for u, i in zip(uris, infos) if i is not None]


def _kind(uri: str) -> str:
    name = uri.lower().rsplit("/", 1)[-1]
    return "tar" if name.endswith(".tar") else "parquet" if name.endswith(".parquet") else \
        "csv" if name.endswith(".csv") else "image" if name.endswith(IMAGE_EXTENSIONS) else "other"


def _from_files(source: str, files: list[tuple[str, dict]], storage_options: dict | None, format: str,
                classes: tuple[str, ...] | None, options: ReadOptions) -> ImageSource:
    """A source given as files (one file, a glob, a brace range, a list)."""
    kinds = {_kind(u) for u, _ in files}
    if format == "auto":
        if kinds == {"tar"}:
            format = "webdataset"
        elif kinds == {"parquet"}:
            format = _parquet_format(files[0][0], storage_options, options, len(files))
        elif kinds == {"csv"} and len(files) == 1:
            format = "manifest"
        else:
            shown = ", ".join(sorted(kinds))
            raise SourceError(f"{source!r} names {len(files)} files of kinds {shown}; freezeray reads .tar shards "
                              "(webdataset), .parquet files (image bytes or manifests) or one .parquet/.csv manifest. "
                              "Pass format=... to say how to read them")
    root = _common_root([u for u, _ in files])
    if format == "manifest":
        if len(files) != 1:
            raise SourceError(f"format='manifest' reads one file; {source!r} names {len(files)} "
                              "(use format='manifests' for a folder or list of Parquet manifests)")
        return _from_manifest(files[0][0], storage_options, classes, options)
    if format == "folder":
        raise SourceError(f"format='folder' needs a folder; {source!r} names files")
    kind = {"webdataset": "tar", "parquet": "parquet", "manifests": "manifest"}[format]
    shards = tuple(InputShard(u, kind, int(i.get("size") or -1), _version(i)) for u, i in files)  # type: ignore[arg-type]
    return _sharded(source, format, shards, root, storage_options, classes, options)


def _common_root(uris: list[str]) -> str:
    parents = [u.rsplit("/", 1)[0] for u in uris]
    root = posixpath.commonpath([p.split("://", 1)[-1] for p in parents]) if parents else ""
    scheme = uris[0].split("://", 1)[0] + "://" if "://" in uris[0] else ""
    return scheme + root if scheme else root


def _is_output_folder(names: set[str]) -> bool:
    return any(m in names for m in OUTPUT_MARKERS) or ({"manifest.json", "shards"} <= names)


def _from_folder(source: str, fs: Any, root: str, storage_options: dict | None, format: str,
                 classes: tuple[str, ...] | None, options: ReadOptions, extensions: tuple[str, ...],
                 allow_empty: bool) -> ImageSource:
    """A folder: shards (tars, Parquet files) or an ImageFolder, walked once. Hidden names and
    freezeray's own output folders are skipped."""
    root = root.rstrip("/")
    images: list[tuple[str, str, int, str]] = []  # (path, class folder, size, version)
    shard_files: dict[str, list[tuple[str, dict]]] = {"tar": [], "parquet": []}
    folders: set[str] = set()
    holding_outputs: set[str] = set()  # class-level folders with a freezeray output inside
    stray = skipped = outputs = 0

    def walk() -> None:
        nonlocal stray, skipped, outputs
        images.clear()
        for key in shard_files:
            shard_files[key].clear()
        folders.clear()
        holding_outputs.clear()
        stray = skipped = outputs = 0
        for path, dirs, files in fs.walk(root, detail=True):
            rel = path.rstrip("/")[len(root):].strip("/")
            parts = rel.split("/") if rel else []
            for d in [d for d in dirs if d.startswith(".")]:
                del dirs[d]
            if rel and _is_output_folder(set(dirs) | set(files)):
                outputs += 1
                holding_outputs.add(parts[0])
                dirs.clear()
                continue
            if len(parts) == 1:
                folders.add(parts[0])
            for name, info in sorted(files.items()):
                if name.startswith(".") or name.startswith("_"):
                    continue
                full = f"{path.rstrip('/')}/{name}"
                kind = _kind(name)
                if kind in shard_files:
                    shard_files[kind].append((_full_uri(source, full), info))
                elif name.lower().endswith(extensions):
                    if not parts:
                        stray += 1
                    else:
                        images.append((_full_uri(source, full), parts[0], int(info.get("size") or -1), _version(info)))
                else:
                    skipped += 1

    storage.retrying(walk, f"list {source}")
    folders -= holding_outputs - {r[1] for r in images}  # a folder that only holds outputs is not a class
    if outputs:
        log.info("skipped %d freezeray output folder(s) under %s", outputs, source)
    found = {k: len(v) for k, v in shard_files.items() if v}
    if format == "auto":
        if images and found:
            raise SourceError(f"{source!r} holds {len(images)} image files in class folders and also "
                              f"{', '.join(f'{n} .{k} files' for k, n in found.items())}; pass format='folder', "
                              "'webdataset' or 'parquet' (or point at a sub-folder)")
        if len(found) > 1:
            raise SourceError(f"{source!r} holds both .tar and .parquet files; pass format='webdataset' or 'parquet'")
        if found.get("tar"):
            format = "webdataset"
        elif found.get("parquet"):
            format = _parquet_format(shard_files["parquet"][0][0], storage_options, options, found["parquet"])
        else:
            format = "folder"
    if format == "folder":
        return _image_folder(source, images, folders, stray, skipped, extensions, classes, allow_empty,
                             storage_options)
    if format == "manifest":
        raise SourceError(f"format='manifest' reads one file; {source!r} is a folder (format='manifests' reads a "
                          "folder of Parquet manifests)")
    kind = "tar" if format == "webdataset" else "parquet"
    files = sorted(shard_files[kind])
    if not files:
        looked = ".tar files" if format == "webdataset" else ".parquet files"
        raise SourceError(f"no {looked} under {source!r} (format={format!r})")
    shard_kind = {"webdataset": "tar", "parquet": "parquet", "manifests": "manifest"}[format]
    shards = tuple(InputShard(u, shard_kind, int(i.get("size") or -1), _version(i)) for u, i in files)  # type: ignore[arg-type]
    return _sharded(source, format, shards, _full_uri(source, root), storage_options, classes, options)


def _image_folder(source: str, images: list[tuple[str, str, int, str]], folders: set[str], stray: int, skipped: int,
                  extensions: tuple[str, ...], classes: tuple[str, ...] | None, allow_empty: bool,
                  storage_options: dict | None) -> ImageSource:
    if stray:
        log.warning("%d image files directly under %s have no class folder and were skipped", stray, source)
    if skipped:
        log.info("%d files under %s do not have an image extension (%s) and were skipped", skipped, source,
                 ", ".join(extensions))
    bad_names = sorted(printable(f) for f in folders if _utf8_problem(f))
    if bad_names:
        raise SourceError(f"class folder names under {source!r} are not valid UTF-8: {bad_names[:20]}; rename them")
    if not images:
        raise SourceError(f"no images under {source!r}: looked for <class>/<image> files with extensions "
                          f"{', '.join(extensions)}, .tar shards (webdataset) and .parquet files")
    images.sort()
    with_images = {r[1] for r in images}
    empty = sorted(folders - with_images)
    if empty and not allow_empty:
        raise FileNotFoundError(
            f"class folders with no image files under {source!r}: {empty[:20]}{' ...' if len(empty) > 20 else ''} "
            f"({len(empty)}). Add images, remove the folders, or pass allow_empty=True to keep them as classes"
        )
    names = sorted(folders) if allow_empty else sorted(with_images)
    mapping = class_mapping(names, classes, source)
    errors = [_utf8_problem(r[0]) for r in images]
    table = pa.table({
        "row_id": pa.array(np.arange(len(images), dtype=np.int64)),
        "path": pa.array([printable(r[0]) if e else r[0] for r, e in zip(images, errors)], pa.string()),
        "label": pa.array([mapping[r[1]] for r in images], pa.int32()),
        "size": pa.array([r[2] for r in images], pa.int64()),
        "version": pa.array([r[3] for r in images], pa.string()),
        "error": pa.array(errors, pa.string()),
    })
    return ImageSource(source, "folder", tuple(classes) if classes else tuple(names), files=table,
                       root=source.rstrip("/"), storage_options=storage_options)


def _utf8_problem(path: str) -> str:
    """"" when ``path`` is valid UTF-8, else the reason (local names with undecodable bytes
    arrive as lone surrogates)."""
    try:
        path.encode("utf-8")
        return ""
    except UnicodeEncodeError:
        return "file name is not valid UTF-8 (shown with \\x escapes); rename the file to featurize it"


def printable(path: str) -> str:
    """``path`` with undecodable bytes as ``\\xNN`` escapes (valid UTF-8, for Parquet)."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


# ---------------------------------------------------------------------------------------
# manifests


def _from_manifest(source: str, storage_options: dict | None, classes: tuple[str, ...] | None,
                   options: ReadOptions) -> ImageSource:
    table = read_table(source, storage_options)
    if "path" not in table.column_names:
        raise SourceError(f"manifest {source!r} needs a 'path' column; it has {table.column_names}")
    root = source.rsplit("/", 1)[0] if "/" in source else "."
    paths = resolve_paths(table.column("path").to_pylist(), source, root, options.allow_outside)
    n = len(paths)
    if n == 0:
        raise SourceError(f"manifest {source!r} lists no images")
    if "label" in table.column_names:
        labels, names = label_column(table.column("label").to_pylist(), classes, f"manifest {source!r}")
    else:
        labels, names = np.full(n, -1, dtype=np.int32), tuple(classes or ())
    out = pa.table({
        "row_id": pa.array(np.arange(n, dtype=np.int64)),
        "path": pa.array(paths, pa.string()),
        "label": pa.array(labels, pa.int32()),
        "size": pa.array(np.full(n, -1, dtype=np.int64)),
        "version": pa.array([""] * n, pa.string()),
        "error": pa.array([""] * n, pa.string()),
    })
    return ImageSource(source, "manifest", names, files=out, root=root, options=options, storage_options=storage_options)


# ---------------------------------------------------------------------------------------
# sharded sources: a look at one file decides how rows are read; rows are read in Ray tasks


def _parquet_format(uri: str, storage_options: dict | None, options: ReadOptions, count: int) -> str:
    schema = parquet_schema(uri, storage_options)
    if image_column(schema, options.image_key) is not None:
        return "parquet"
    if "path" in schema.names:
        return "manifest" if count == 1 else "manifests"
    raise SourceError(f"{uri!r} is a Parquet file with neither image bytes nor a 'path' column (columns "
                      f"{schema.names}); name the image column with image_key=")


def _sharded(source: str, format: str, shards: tuple[InputShard, ...], root: str, storage_options: dict | None,
             classes: tuple[str, ...] | None, options: ReadOptions) -> ImageSource:
    if format == "webdataset":
        return _webdataset(source, shards, root, storage_options, classes, options)
    if format == "parquet":
        return _parquet_images(source, shards, root, storage_options, classes, options)
    return _manifests(source, shards, root, storage_options, classes, options)


def _webdataset(source: str, shards: tuple[InputShard, ...], root: str, storage_options: dict | None,
                classes: tuple[str, ...] | None, options: ReadOptions) -> ImageSource:
    """Tar shards: the first sample of the first shard says which keys hold the image and the label."""
    keys = first_sample(shards[0].uri, storage_options)
    if keys is None:
        raise SourceError(f"{shards[0].uri!r} holds no sample (an empty or unreadable tar)")
    image = options.image_key or next((k for k in WDS_IMAGE_KEYS if k in keys), None)
    if image is None or image not in keys:
        raise SourceError(f"the first sample of {shards[0].uri!r} has no image member: looked for "
                          f"{options.image_key or '/'.join(WDS_IMAGE_KEYS)}, found {', '.join(sorted(keys)) or 'nothing'}; "
                          "name it with image_key=")
    label = options.label_key or ("cls" if "cls" in keys else None)
    if label is not None and label.split(".", 1)[0] not in keys:
        raise SourceError(f"the first sample of {shards[0].uri!r} has no {label.split('.', 1)[0]!r} member for "
                          f"label_key={label!r}; it has {', '.join(sorted(keys))}")
    names = label is not None and keys.get(label.split(".", 1)[0]) == "text"
    if names and not classes:
        raise SourceError(f"the labels of {source!r} ({label!r}) are class names: pass classes=[...] to fix their order")
    opts = replace(options, label_key=label, label_names=bool(names))  # the image: the first of jpg/jpeg/png/webp per sample
    return ImageSource(source, "webdataset", classes or (), shards=shards, options=opts, root=root,
                       labelled=label is not None, storage_options=storage_options)


def _parquet_images(source: str, shards: tuple[InputShard, ...], root: str, storage_options: dict | None,
                    classes: tuple[str, ...] | None, options: ReadOptions) -> ImageSource:
    """Parquet files with image bytes: the schema of the first file decides the columns; row
    counts come from every file's footer (read in threads: a few KB each)."""
    import pyarrow.parquet as pq

    schema = parquet_schema(shards[0].uri, storage_options)
    image = image_column(schema, options.image_key)
    if image is None:
        raise SourceError(f"{shards[0].uri!r} has no image column{f' {options.image_key!r}' if options.image_key else ''}: "
                          f"columns {schema.names}; name it with image_key=")
    label = options.label_key or next((c for c in ("label", "labels", "cls") if c in schema.names), None)
    if label is not None and label not in schema.names:
        raise SourceError(f"{shards[0].uri!r} has no label column {label!r}: columns {schema.names}")
    hf = hf_class_names(schema, label) if label else None
    names = False
    if label is not None:
        kind = schema.field(label).type
        names = pa.types.is_string(kind) or pa.types.is_large_string(kind)
    if names and not classes:
        raise SourceError(f"the labels of {source!r} ({label!r}) are class names: pass classes=[...] to fix their order")
    fs, _ = storage.filesystem(shards[0].uri, storage_options)

    def rows(shard: InputShard) -> InputShard:
        def footer() -> int:
            with fs.open(storage.filesystem(shard.uri, storage_options)[1], "rb") as f:
                return pq.ParquetFile(f).metadata.num_rows
        return replace(shard, rows=storage.retrying(footer, f"read the footer of {shard.uri}"))

    with ThreadPoolExecutor(16) as pool:
        counted = tuple(pool.map(rows, shards))
    opts = replace(options, image_key=image, label_key=label, label_names=bool(names))
    return ImageSource(source, "parquet", classes or hf or (), shards=counted, options=opts, root=root,
                       labelled=label is not None, storage_options=storage_options)


def _manifests(source: str, shards: tuple[InputShard, ...], root: str, storage_options: dict | None,
               classes: tuple[str, ...] | None, options: ReadOptions) -> ImageSource:
    """A folder of Parquet manifests: each file an input shard. Their ``label`` columns are
    read here (one column, in threads) for the class names and row counts."""
    def scan(shard: InputShard) -> tuple[InputShard, set[Any], bool]:
        table = read_table(shard.uri, storage_options)
        if "path" not in table.column_names:
            raise SourceError(f"manifest {shard.uri!r} needs a 'path' column; it has {table.column_names}")
        has_label = "label" in table.column_names
        values = set(table.column("label").unique().to_pylist()) if has_label else set()
        return replace(shard, rows=table.num_rows), values, has_label

    with ThreadPoolExecutor(16) as pool:
        scanned = list(pool.map(scan, shards))
    labelled = {has for _, _, has in scanned}
    if len(labelled) > 1:
        raise SourceError(f"some manifests under {source!r} have a label column and some do not")
    values = set().union(*(v for _, v, _ in scanned))
    names: tuple[str, ...] = tuple(classes or ())
    text = any(isinstance(v, str) for v in values)
    if labelled == {True}:
        _, names = label_column(sorted(values, key=str), classes, f"the manifests under {source!r}")
    opts = replace(options, label_key="label" if labelled == {True} else None, label_names=text)
    return ImageSource(source, "manifests", names, shards=tuple(s for s, _, _ in scanned), options=opts, root=root,
                       labelled=labelled == {True}, storage_options=storage_options)
