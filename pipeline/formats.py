"""What the stored formats look like inside, for the driver's look at a source
(:mod:`pipeline.sources`) and the read tasks (:mod:`pipeline.readers`) alike: WebDataset
tar samples, Parquet image columns and Hugging Face class names, manifest paths and
labels. No Ray, no torch: decode tasks import this.
"""

from __future__ import annotations

import io
import json
import posixpath
import tarfile
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import pyarrow as pa

from freezeray import storage
from freezeray.errors import InvalidInput

__all__ = ["ImageSource", "InputShard", "SourceError", "ReadOptions", "samples", "first_sample", "Cut", "sample_label", "parse_label",
           "image_column", "hf_class_names", "parquet_schema", "read_table", "resolve_paths", "label_column",
           "class_mapping", "WDS_IMAGE_KEYS"]

WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # webdataset's image extensions, in the order they are tried
_BINARY_NAMES = ("jpg", "jpeg", "png", "webp", "image", "img", "bytes")


class SourceError(InvalidInput, ValueError):
    """An image source that cannot be used as it is (names the source and what to do)."""


@dataclass(frozen=True)
class ReadOptions:
    """How rows are read out of the files (travels to the read tasks)."""

    image_key: str | None = None  # tar member extension or Parquet column holding the image
    label_key: str | None = None  # tar member (``cls``, ``txt``, ``json.<field>``) or Parquet column
    label_names: bool = False  # labels are class names (mapped through ``classes``), not indices
    allow_outside: bool = False  # manifests may list files outside their own folder

    def to_dict(self) -> dict[str, Any]:
        return {"image_key": self.image_key, "label_key": self.label_key, "label_names": self.label_names,
                "allow_outside": self.allow_outside}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ReadOptions":
        return cls(**d)


def class_mapping(names: Sequence[str], classes: Sequence[str] | None, source: str) -> dict[str, int]:
    if classes is None:
        return {c: i for i, c in enumerate(names)}
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise SourceError(f"{source!r} has classes {unknown[:10]} that are not in the given classes {list(classes)[:20]}")
    return {c: i for i, c in enumerate(classes)}


def read_table(uri: str, storage_options: dict | None, columns: list[str] | None = None) -> pa.Table:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    data = storage.read_bytes(uri, storage_options)
    if uri.lower().endswith(".csv"):
        table = pacsv.read_csv(io.BytesIO(data))
        return table.select(columns) if columns else table
    return pq.read_table(io.BytesIO(data), columns=columns)


def resolve_paths(paths: list[Any], manifest: str, root: str, allow_outside: bool) -> list[str]:
    """A manifest's ``path`` values as URIs: relative ones from the manifest's folder; every
    path must stay inside ``root`` (the manifest's folder, or the folder of manifests).

    Raises:
        SourceError: an empty path, or paths outside ``root`` (unless ``allow_outside``).
    """
    base = manifest.rsplit("/", 1)[0] if "/" in manifest else "."
    protocol = manifest.split("://", 1)[0] if "://" in manifest and not manifest.startswith("file://") else None
    base_path, root_path = base.split("://", 1)[-1], root.split("://", 1)[-1].rstrip("/")
    out, outside = [], []
    for i, p in enumerate(paths):
        if p is None or p == "":
            raise SourceError(f"manifest {manifest!r} has an empty path in row {i}")
        p = str(p)
        if "://" in p:
            scheme, rest = p.split("://", 1)
            same_store = scheme == protocol or (protocol is None and scheme == "file")
            resolved, full = posixpath.normpath(rest), p
        else:
            same_store = True
            resolved = posixpath.normpath(p if p.startswith("/") else posixpath.join(base_path, p))
            full = f"{protocol}://{resolved}" if protocol else resolved
        if not (same_store and (resolved + "/").startswith(root_path + "/")):
            outside.append((i, p))
        out.append(full)
    if outside and not allow_outside:
        shown = "; ".join(f"row {i}: {p!r}" for i, p in outside[:5])
        raise SourceError(
            f"manifest {manifest!r} lists {len(outside)} paths outside its own folder {root!r} ({shown}"
            f"{'; ...' if len(outside) > 5 else ''}); refused so that a manifest cannot point a job at other files. "
            "Move the manifest above the images, or pass allow_outside=True if you trust it"
        )
    return out


def label_column(values: list[Any], classes: Sequence[str] | None, where: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """A manifest's ``label`` values as indices, and the classes: integer labels index
    ``classes`` (default ``0..max``), names map through the sorted names (or ``classes``)."""
    if any(v is None for v in values):
        raise SourceError(f"{where} has rows without a label")
    if all(isinstance(v, (int, np.integer)) for v in values):
        names = tuple(classes) if classes else tuple(str(i) for i in range(max(values, default=-1) + 1))
        bad = sorted({int(v) for v in values if v < 0 or v >= len(names)})
        if bad:
            raise SourceError(f"{where} has labels {bad[:10]} outside 0..{len(names) - 1}")
        return np.asarray(values, dtype=np.int32), names
    text = [str(v) for v in values]
    names = tuple(classes) if classes else tuple(sorted(set(text)))
    mapping = class_mapping(sorted(set(text)), names, where)
    return np.asarray([mapping[v] for v in text], dtype=np.int32), names


def parquet_schema(uri: str, storage_options: dict | None) -> Any:
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(uri, storage_options)

    def read() -> Any:
        with fs.open(path, "rb") as f:
            return pq.ParquetFile(f).schema_arrow

    return storage.retrying(read, f"read the schema of {uri}")


def image_column(schema: Any, image_key: str | None) -> str | None:
    """The column holding image bytes: ``image_key``, else an ``{bytes, path}`` struct (the
    Hugging Face ``Image`` feature), else a binary column with an image name, else the only
    binary column."""
    def is_image(t: Any) -> bool:
        return pa.types.is_binary(t) or pa.types.is_large_binary(t) or (
            pa.types.is_struct(t) and any(t.field(i).name == "bytes" for i in range(t.num_fields)))

    if image_key is not None:
        if image_key not in schema.names or not is_image(schema.field(image_key).type):
            return None
        return image_key
    structs = [f.name for f in schema if pa.types.is_struct(f.type) and is_image(f.type)]
    if structs:
        return "image" if "image" in structs else structs[0]
    binary = [f.name for f in schema if is_image(f.type)]
    named = [n for n in binary if n.lower() in _BINARY_NAMES]
    return named[0] if named else (binary[0] if len(binary) == 1 else None)


def hf_class_names(schema: Any, column: str) -> tuple[str, ...] | None:
    """Class names of a Hugging Face ``ClassLabel`` column, from the file's metadata."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return None
    try:
        feature = json.loads(raw)["info"]["features"][column]
    except (KeyError, TypeError, ValueError):
        return None
    names = feature.get("names") if isinstance(feature, dict) else None
    return tuple(str(n) for n in names) if names else None


def parse_label(value: Any, opts: ReadOptions, classes: tuple[str, ...]) -> tuple[int, str]:
    """(label index, "" or why it is not one)."""
    if value is None:
        return -1, "no label"
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", "replace").strip()
    if isinstance(value, str) and not opts.label_names and not value.lstrip("-").isdigit():
        return -1, f"label {value!r} is not an integer (this set's labels are class indices)"
    if opts.label_names:
        name = str(value)
        if name not in classes:
            shown = ", ".join(classes[:10]) + (" ..." if len(classes) > 10 else "")
            return -1, f"label {name!r} is not one of the classes ({shown})"
        return classes.index(name), ""
    try:
        index = int(value)
    except (TypeError, ValueError):
        return -1, f"label {value!r} is not an integer"
    if index < 0 or (classes and index >= len(classes)):
        return -1, f"label {index} is outside 0..{len(classes) - 1}" if classes else f"label {index} is negative"
    return index, ""


def sample_label(parts: dict[str, bytes], opts: ReadOptions, classes: tuple[str, ...]) -> tuple[int, str]:
    key = opts.label_key
    if key is None:
        return -1, ""
    base, _, field = key.partition(".")
    if base not in parts:
        return -1, f"sample has no {base!r} member for its label"
    raw: Any = parts[base]
    if field:
        try:
            raw = json.loads(raw)
            for name in field.split("."):
                raw = raw[name]
        except (ValueError, KeyError, TypeError) as exc:
            return -1, f"label {key!r} not found in the sample's {base} ({type(exc).__name__}: {exc})"
    return parse_label(raw, opts, classes)


def _split_name(name: str) -> tuple[str, str] | None:
    """webdataset's rule: the key is the name up to the first dot of its file name."""
    directory, _, base = name.rpartition("/")
    if "." not in base or base.startswith("."):
        return None
    stem, ext = base.split(".", 1)
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


class Cut(Exception):
    """A tar stream that ended mid-member (the file itself is cut)."""


def samples(fileobj: Any, size: int | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of each sample of a tar stream, in order.

    Raises:
        Cut: the stream ends inside a member, or (``size``: the file's bytes) before the two
            zero blocks that end every tar (a cut at or inside a header, which ``tarfile``
            alone reads as the end of the archive).
    """
    try:
        archive = tarfile.open(fileobj=fileobj, mode="r|")
    except tarfile.ReadError as exc:
        if "empty" in str(exc).lower():
            return
        raise Cut(f"not a tar file or cut before its first member ({exc})") from None
    current, parts = None, {}
    try:
        for member in archive:
            if not member.isfile():
                continue
            split = _split_name(member.name)
            if split is None:
                continue
            data = archive.extractfile(member).read()  # type: ignore[union-attr]
            if len(data) != member.size:
                raise Cut(f"member {member.name!r} is cut after {len(data)} of {member.size} bytes")
            key, ext = split
            if key != current:
                if current is not None:
                    yield current, parts
                current, parts = key, {}
            parts[ext] = data
    except (tarfile.TarError, EOFError) as exc:
        if current is not None and parts:
            yield current, parts
        raise Cut(str(exc) or type(exc).__name__) from None
    if current is not None:
        yield current, parts
    if size is not None and size - archive.offset < 2 * tarfile.BLOCKSIZE:
        raise Cut(f"the file ends without the end-of-archive blocks, {size - archive.offset} bytes after its last "
                  f"whole member")


def first_sample(uri: str, storage_options: dict[str, Any] | None) -> dict[str, str] | None:
    """The members of a tar's first sample: extension -> ``"int"``, ``"text"`` (a text
    member that is not an integer) or ``"bytes"``; None for a tar without samples. Reads
    only the start of the file."""
    fs, path = storage.filesystem(uri, storage_options)

    def peek() -> dict[str, str] | None:
        with fs.open(path, "rb", block_size=1 << 20) as f:
            try:
                for _, parts in samples(f):
                    return {ext: _member_kind(ext, data) for ext, data in parts.items()}
            except Cut:
                return None
        return None

    return storage.retrying(peek, f"read the first sample of {uri}")


def _member_kind(ext: str, data: bytes) -> str:
    if ext in ("cls", "txt", "cls2", "index"):
        text = data.decode("utf-8", "replace").strip()
        return "int" if text.lstrip("-").isdigit() else "text"
    return "bytes"


@dataclass(frozen=True)
class InputShard:
    """One input file of a sharded source (a tar, a Parquet file, a manifest fragment)."""

    uri: str  # the file
    kind: Literal["tar", "parquet", "manifest"]
    size: int = -1  # bytes, -1: unknown
    version: str = ""  # ETag or modification time: changes when the file does
    rows: int | None = None  # when known without reading it (Parquet footers)

    @property
    def name(self) -> str:
        """The file's name without its extension (``00012`` for ``.../00012.tar``)."""
        base = self.uri.rstrip("/").rsplit("/", 1)[-1]
        return base.rsplit(".", 1)[0] if "." in base else base


@dataclass(frozen=True)
class ImageSource:
    """A recognised image set: its layout, classes, and either its loose files (one row
    each) or its input shards."""

    uri: str  # what it was read from (a folder, file, glob, brace pattern, or the first of a list)
    format: str  # folder, manifest, manifests, webdataset, parquet
    classes: tuple[str, ...]  # class names by label index (empty: unlabelled, or integer labels not yet seen)
    # loose files: row_id, path (full URI), label (int32, -1: none), size (int64, -1: unknown), version (str), error (str)
    files: pa.Table | None = field(default=None, repr=False)
    shards: tuple[InputShard, ...] = field(default=(), repr=False)
    options: ReadOptions = field(default_factory=ReadOptions, repr=False)
    root: str = ""  # the folder relative names and manifest confinement are taken from
    labelled: bool | None = None  # sharded sources: whether rows carry labels (None: loose, from the labels)
    storage_options: dict[str, Any] | None = field(default=None, repr=False, compare=False)  # never logged

    @property
    def layout(self) -> str:
        return self.format

    @property
    def sharded(self) -> bool:
        """Whether rows come from input shards (read in Ray tasks) rather than loose files."""
        return self.files is None

    @property
    def rows(self) -> int | None:
        """Images in the set, when known before reading it (tar shards: None)."""
        if self.files is not None:
            return self.files.num_rows
        counts = [s.rows for s in self.shards]
        return None if any(c is None for c in counts) else int(sum(c or 0 for c in counts))

    def __len__(self) -> int:
        rows = self.rows
        if rows is None:
            raise TypeError(f"the number of images in {self.uri!r} ({self.format}, {len(self.shards)} shards) is known "
                            "only once its shards are read; use .rows (None here) or featurize it")
        return rows

    def _loose(self, what: str) -> pa.Table:
        if self.files is None:
            raise ValueError(f"{what} lists loose files; {self.uri!r} is {self.format} shards ({len(self.shards)}), "
                             "whose rows are read in Ray tasks")
        return self.files

    @property
    def paths(self) -> list[str]:
        return self._loose("paths").column("path").to_pylist()

    @property
    def labels(self) -> np.ndarray:
        return self._loose("labels").column("label").to_numpy()

    @property
    def labeled(self) -> bool:
        if self.files is None:
            return bool(self.labelled)
        return bool(len(self)) and bool((self.labels >= 0).all())

    def subset(self, rows: np.ndarray) -> "ImageSource":
        """The loose files at positions ``rows`` (their row ids are kept)."""
        return replace(self, files=self._loose("subset").take(pa.array(np.asarray(rows, dtype=np.int64))))

    def listing_hash(self) -> str:
        """A hash of what was listed: every input shard (URI, size, version), or every loose
        file (path, label, size, version); it changes when the set does."""
        import hashlib

        h = hashlib.sha256(f"freezeray.listing/2\n{self.format}\n".encode())
        h.update("\n".join(self.classes).encode())
        if self.files is None:
            h.update("\n".join(f"{s.uri}\t{s.size}\t{s.version}" for s in self.shards).encode())
        else:
            for col in ("path", "label", "size", "version"):
                arr = self.files.column(col).combine_chunks()
                h.update("\0".join(map(str, arr.to_pylist())).encode("utf-8", "surrogateescape"))
        return h.hexdigest()[:32]

    def describe(self) -> str:
        if self.files is not None:
            return f"{self.files.num_rows} images ({self.format}) at {self.uri}"
        return f"{len(self.shards)} {self.format} shards at {self.uri}"
