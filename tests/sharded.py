"""Sharded image sets for tests, written with the libraries that write them for real:
WebDataset tar shards with ``webdataset.TarWriter`` (as img2dataset does) and Parquet files
with image bytes with Hugging Face ``datasets`` (an ``image`` struct and a ``ClassLabel``)."""

from __future__ import annotations

import io
import os
from pathlib import Path

from imagesets import COLOURS, bad_files, write_image_folder

CLASSES = tuple(sorted(COLOURS))


def images(per_class: int = 8, size: int = 24, seed: int = 0, bad: bool = True) -> dict[str, tuple[bytes, int]]:
    """{relative path: (bytes, label)} of generated images (JPEG/PNG/WebP, odd modes), plus
    three bad files (a truncated JPEG, an empty file, a text file named .jpg)."""
    out: dict[str, tuple[bytes, int]] = {}

    def put(path: str, data: bytes) -> None:
        out[path] = (data, CLASSES.index(path.split("/")[0]))

    write_image_folder(put, per_class=per_class, size=size, seed=seed)
    if bad:
        for path, data in bad_files().items():
            put(path, data)
    return dict(sorted(out.items()))


def write_folder(root: Path, items: dict[str, tuple[bytes, int]]) -> Path:
    for rel, (data, _) in items.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def key_of(rel: str) -> str:
    """The WebDataset key of an image (its path without the extension)."""
    return rel.rsplit(".", 1)[0]


def tar_bytes(items: dict[str, tuple[bytes, int]], labels: bool = True) -> bytes:
    """One tar shard of ``items``, a sample each (``<key>.<ext>`` and ``<key>.cls``)."""
    import webdataset as wds

    buf = io.BytesIO()
    with wds.TarWriter(buf) as writer:
        for rel, (data, label) in items.items():
            ext = rel.rsplit(".", 1)[1]
            sample = {"__key__": key_of(rel), ext: data}
            if labels:
                sample["cls"] = label
            writer.write(sample)
    return buf.getvalue()


def chunks(items: dict[str, tuple[bytes, int]], per: int) -> list[dict[str, tuple[bytes, int]]]:
    keys = list(items)
    return [{k: items[k] for k in keys[i:i + per]} for i in range(0, len(keys), per)]


def write_tars(put, items: dict[str, tuple[bytes, int]], per: int, first: int = 0) -> list[str]:
    """Tar shards ``00000.tar``, ``00001.tar``, ... of ``per`` samples through ``put(name, bytes)``."""
    names = []
    for i, part in enumerate(chunks(items, per), start=first):
        name = f"{i:05d}.tar"
        put(name, tar_bytes(part))
        names.append(name)
    return names


def hf_parquet_bytes(items: dict[str, tuple[bytes, int]]) -> bytes:
    """A Parquet file as Hugging Face ``datasets`` writes it: ``image`` {bytes, path}, ``label`` ClassLabel."""
    import tempfile

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": data, "path": rel} for rel, (data, _) in items.items()],
                                     "label": [label for _, label in items.values()]}, features=features)
    with tempfile.TemporaryDirectory() as tmp:
        ds.to_parquet(f"{tmp}/part.parquet")
        return Path(f"{tmp}/part.parquet").read_bytes()
