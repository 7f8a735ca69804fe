"""Which storage errors are retried, and for how long: the rule behind every read and
write freezeray makes."""

from __future__ import annotations

import errno
import time

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from freezeray import storage


def _client_error(status: int, code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "GetObject")


@pytest.mark.parametrize("exc, transient", [
    (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), True),
    (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), True),
    (TimeoutError("slow"), True),
    (OSError(errno.EREMOTEIO, "We encountered an internal error, please try again."), True),  # s3fs: 500
    (OSError(errno.EBUSY, "Please reduce your request rate."), True),  # s3fs: 503 SlowDown
    (_client_error(503, "SlowDown"), True),
    (_client_error(500, "InternalError"), True),
    (FileNotFoundError("s3://b/k"), False),
    (PermissionError(errno.EACCES, "Access Denied"), False),
    (FileExistsError("s3://b/k"), False),
    (_client_error(403, "AccessDenied"), False),
    (ValueError("bad value"), False),
])
def test_transient_errors_are_told_apart(exc, transient):
    assert storage.is_transient(exc) is transient


def test_retrying_backs_off_until_success_and_gives_up_at_the_deadline(ledger):
    calls = []

    def flaky():
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise ConnectionResetError(errno.ECONNRESET, "reset")
        return "ok"

    assert storage.retrying(flaky, "read x", deadline=10) == "ok"
    gaps = [b - a for a, b in zip(calls, calls[1:])]
    assert len(calls) == 3 and 0.35 < gaps[0] < 0.7 and 0.75 < gaps[1] < 1.3  # 0.5 s, then 1 s (±20% jitter)

    started = time.monotonic()
    with pytest.raises(storage.StorageUnavailable, match=r"while trying to write y: \d+ tries over .* ConnectionRefused"):
        storage.retrying(lambda: (_ for _ in ()).throw(ConnectionRefusedError(errno.ECONNREFUSED, "refused")),
                         "write y", deadline=2)
    assert time.monotonic() - started < 3.5

    missing = []
    with pytest.raises(FileNotFoundError):
        storage.retrying(lambda: missing.append(1) or (_ for _ in ()).throw(FileNotFoundError("z")), "read z")
    assert missing == [1]  # not retried
    ledger(tried="transient failures, a storage that never answers, a missing object", inputs=3,
           checked="retried with 0.5 s, 1 s back-off then success; StorageUnavailable within the window; "
                   "missing objects raised at once")
