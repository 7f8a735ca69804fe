"""URIs on any fsspec filesystem: local paths, ``file://``, ``s3://``, ``gs://``, ``memory://``.

Every path freezeray reads or writes goes through these few functions, so that
``storage_options`` (endpoints, credentials) are handled in one place and never logged.

Object stores fail for a while and come back (a restarted gateway, a dropped connection,
a throttled bucket). Reads and writes here retry such *transient* errors with exponential
back-off for up to ``FREEZERAY_IO_RETRY_SECONDS`` seconds (default 120), then raise
:class:`StorageUnavailable`; errors that retrying cannot fix (a missing object, denied
access) are raised at once.
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import random
import time
import uuid
from typing import Any, Callable, TypeVar

import fsspec
from fsspec.core import url_to_fs

from freezeray.errors import DataUnavailable

__all__ = ["filesystem", "join", "read_bytes", "write_bytes", "create_bytes", "delete", "exists", "is_local",
           "redact", "retrying", "is_transient", "StorageUnavailable", "retry_seconds"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# exception classes (by name, anywhere in the MRO) that mean "try again later": botocore's
# connection errors and timeouts, aiohttp's connection errors, fsspec's timeout
_TRANSIENT_CLASSES = {
    "ConnectionError", "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
    "ConnectionClosedError", "ClientConnectorError", "ClientOSError", "ServerDisconnectedError",
    "ServerTimeoutError", "ClientPayloadError", "FSTimeoutError", "IncompleteReadError", "ResponseStreamingError",
}
_TRANSIENT_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EPIPE,
                     errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EAGAIN, errno.EBUSY,
                     errno.EREMOTEIO}  # s3fs: EBUSY for 503/SlowDown, EREMOTEIO for 500/InternalError
# S3 error codes for a server that is there but cannot answer now
_TRANSIENT_CODES = ("SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling")


class StorageUnavailable(DataUnavailable, ConnectionError):
    """Storage kept failing with transient errors for the whole retry window."""


def retry_seconds() -> float:
    """How long transient storage errors are retried: ``FREEZERAY_IO_RETRY_SECONDS`` (default 120)."""
    try:
        return max(0.0, float(os.environ.get("FREEZERAY_IO_RETRY_SECONDS", "120")))
    except ValueError:
        return 120.0


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a storage error that may go away by itself (connection refused or
    reset, timeouts, S3's 5xx/throttling); missing files and denied access are not."""
    if isinstance(exc, (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, TimeoutError):
        return True
    if any(cls.__name__ in _TRANSIENT_CLASSES for cls in type(exc).__mro__):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    if isinstance(exc, OSError) and any(code in str(exc) for code in _TRANSIENT_CODES):
        return True
    response = getattr(exc, "response", None)  # botocore's ClientError
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        if status >= 500 or status == 429 or response.get("Error", {}).get("Code") in _TRANSIENT_CODES:
            return True
    cause = exc.__cause__ or exc.__context__
    return cause is not None and cause is not exc and is_transient(cause)


def retrying(fn: Callable[[], T], what: str, deadline: float | None = None) -> T:
    """``fn()``, retried on transient errors with exponential back-off (0.5 s doubling to
    10 s, with jitter) until ``deadline`` seconds (default :func:`retry_seconds`) have passed.

    Raises:
        StorageUnavailable: still failing at the deadline (the last error is its cause).
    """
    limit = retry_seconds() if deadline is None else deadline
    start = time.monotonic()
    delay, tries = 0.5, 0
    while True:
        tries += 1
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            waited = time.monotonic() - start
            if waited + delay > limit:
                raise StorageUnavailable(
                    f"storage unavailable while trying to {what}: {tries} tries over {waited:.1f}s failed, the last "
                    f"with {type(exc).__name__}: {exc}. Retries last FREEZERAY_IO_RETRY_SECONDS={limit:g}s"
                ) from exc
            log.warning("storage error while trying to %s (%s: %s); retrying in %.1fs", what, type(exc).__name__,
                        exc, delay)
            time.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(10.0, delay * 2)


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
    """The whole object at ``uri`` (transient errors retried)."""
    fs, path = filesystem(uri, storage_options)
    return retrying(lambda: fs.cat_file(path), f"read {uri}")


def write_bytes(uri: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Write a whole object. Readers see either nothing or all of it.

    Object stores publish an object only when its upload completes; on a local disk the
    bytes go to a temporary file in the same folder that is then renamed into place.
    """
    fs, path = filesystem(uri, storage_options)
    if is_local(uri):
        tmp = _local_temp(path, data)
        os.replace(tmp, path)
        return

    retrying(lambda: _put(fs, path, data, "overwrite"), f"write {uri}")


def create_bytes(uri: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Write a whole object only if nothing is there yet, atomically: of two writers racing
    for the same ``uri``, exactly one succeeds. On object stores this is a conditional
    ``PUT`` (``If-None-Match: *``); on a local disk a hard link of a finished temporary file.

    Raises:
        FileExistsError: ``uri`` already exists (the object is left as it was).
    """
    fs, path = filesystem(uri, storage_options)
    if is_local(uri):
        tmp = _local_temp(path, data)
        try:
            os.link(tmp, path)  # fails if ``path`` exists; never exposes a partial file
        finally:
            os.unlink(tmp)
        return

    try:
        retrying(lambda: _put(fs, path, data, "create"), f"create {uri}")
    except FileExistsError:
        raise FileExistsError(f"{uri} already exists") from None


def _put(fs: fsspec.AbstractFileSystem, path: str, data: bytes, mode: str) -> None:
    """One whole-object upload; ``mode="create"`` raises FileExistsError if one is there."""
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)  # object stores: creates a missing bucket
    try:
        fs.pipe_file(path, data, mode=mode)
    except OSError as exc:
        # 412 Precondition Failed: s3fs raises FileExistsError when the answer names the
        # condition (AWS), else EINVAL with the message (SeaweedFS, MinIO)
        if mode == "create" and "pre-condition" in str(exc).lower().replace("precondition", "pre-condition"):
            raise FileExistsError(path) from None
        raise


def _local_temp(path: str, data: bytes) -> str:
    """``data`` written and synced to a temporary file next to ``path``; returns its name."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def delete(uri: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Delete the object at ``uri``; False when there was none."""
    fs, path = filesystem(uri, storage_options)

    def rm() -> bool:
        try:
            fs.rm_file(path)
            return True
        except FileNotFoundError:
            return False

    return retrying(rm, f"delete {uri}")


def exists(uri: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = filesystem(uri, storage_options)
    return retrying(lambda: fs.exists(path), f"look up {uri}")


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
