"""Looking inside a freezeray output folder from tests: which shards are sealed (their file
exists) whatever the manifest says."""

from __future__ import annotations

import re

from freezeray import storage

_NAME = re.compile(r"^(?:part-)?(\d+)-[0-9a-f]{12}\.parquet$")


def sealed_shards(output: str, storage_options: dict | None = None) -> dict[int, str]:
    """{shard number: URI of its file} of the shards sealed under ``output``, committed or
    not: ``shards/part-00003-<hash>.parquet`` for loose files, ``shards/00003-<hash>.parquet``
    for the tar shard ``00003.tar`` (tests name their tars by their shard number)."""
    folder = storage.join(output, "shards")
    if not storage.exists(folder, storage_options):
        return {}
    fs, root = storage.filesystem(folder, storage_options)
    fs.invalidate_cache()
    found = {}
    for path in fs.ls(root, detail=False):
        name = path.rsplit("/", 1)[-1]
        m = _NAME.match(name)
        if m:
            found[int(m.group(1))] = storage.join(output, "shards", name)
    return found
