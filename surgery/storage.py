"""URIs on any fsspec filesystem: local paths, ``file://``, ``s3://``, ``gs://``, ``memory://``.

Every path freezeray reads or writes goes through these few functions, so that
``storage_options`` (endpoints, credentials) are handled in one place and never logged.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from typing import Any

import fsspec
from fsspec.core import url_to_fs

__all__ = ["filesystem", "join", "read_bytes", "write_bytes", "exists", "is_local", "redact"]


def filesystem(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path inside it.

    Example:
        >>> fs, path = filesystem("s3://bucket/features", {"key": "...", "secret": "..."})
    """
    return url_to_fs(str(uri), **(storage_options or {}))


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI (``s3://b/x`` + ``y`` -> ``s3://b/x/y``)."""
    uri = str(uri)
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://{posixpath.join(rest, *parts)}"
    return os.path.join(uri, *parts)


def is_local(uri: str) -> bool:
    return "://" not in str(uri) or str(uri).startswith("file://")


def read_bytes(uri: str, storage_options: dict[str, Any] | None = None) -> bytes:
    fs, path = filesystem(uri, storage_options)
    return fs.cat_file(path)


def write_bytes(uri: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Write a whole object. Readers see either nothing or all of it.

    Object stores publish an object only when its upload completes; on a local disk the
    bytes go to a temporary file in the same folder that is then renamed into place.
    """
    fs, path = filesystem(uri, storage_options)
    parent = posixpath.dirname(path) if not is_local(uri) else os.path.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if is_local(uri):
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def exists(uri: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = filesystem(uri, storage_options)
    return fs.exists(path)


def redact(storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """``storage_options`` with secrets replaced, for logs and reports."""
    secret_words = ("key", "secret", "token", "password", "credential", "session")

    def clean(value: Any, name: str = "") -> Any:
        if isinstance(value, dict):
            return {k: clean(v, k) for k, v in value.items()}
        if any(w in name.lower() for w in secret_words) and "url" not in name.lower():
            return "***"
        return value

    return clean(dict(storage_options or {}))
