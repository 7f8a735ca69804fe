"""One writer per output folder: a lease object (``_lock.json``) that a featurization
creates before it writes anything and deletes after its commit.

The lease is created with an atomic create-if-absent (a conditional ``PUT`` on object
stores, a hard link on local disks), so of two jobs that start at once exactly one gets
it; the other fails at once with an error naming the holder. The holder renews the lease
from a background thread, checks that it still holds it before each shard and before the
commit, and the manifest itself is created exclusively, so two jobs can never both commit.

A lease whose holder is gone is taken over: at once when the holder ran on this machine
and its process no longer exists (a driver killed with SIGKILL), otherwise when it has not
been renewed for ``timeout`` seconds (a driver on a lost node).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any

from freezeray import storage
from freezeray.errors import OutputBusy

__all__ = ["LEASE", "OutputLease", "LeaseHeld", "LeaseLost", "assert_held"]

log = logging.getLogger(__name__)

LEASE = "_lock.json"

_ACTIVE: set[str] = set()  # owners of the leases this process holds now


class LeaseHeld(OutputBusy, RuntimeError):
    """Another live job is writing to the same output."""


class LeaseLost(OutputBusy, RuntimeError):
    """This job's lease was taken over (it was judged dead): it must stop writing."""


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class OutputLease:
    """The lease on ``output`` for one job. Use as a context manager, or call
    :meth:`acquire` and :meth:`release`.

    Args:
        output: the output folder URI.
        storage_options: fsspec options for it.
        timeout: seconds without renewal after which a lease held from another machine
            counts as abandoned; it is renewed every ``timeout / 4`` seconds.
    """

    def __init__(self, output: str, storage_options: dict[str, Any] | None, timeout: float = 300.0) -> None:
        if not timeout > 0:
            raise ValueError(f"lease timeout must be positive, got {timeout!r}")
        self.uri = storage.join(output, LEASE)
        self.output = output
        self.storage_options = storage_options
        self.timeout = float(timeout)
        self.owner = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: str | None = None
        self._acquired = ""

    def _record(self) -> dict[str, Any]:
        return {"owner": self.owner, "host": socket.gethostname(), "boot_id": _boot_id(), "pid": os.getpid(),
                "acquired": self._acquired, "renewed": time.time(), "timeout": self.timeout}

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(storage.read_bytes(self.uri, self.storage_options))
        except FileNotFoundError:
            return None
        except ValueError:  # unreadable: treat as a lease of unknown age
            return {"owner": "?", "renewed": 0.0}

    def _abandoned(self, held: dict[str, Any]) -> str:
        """Why the lease ``held`` no longer protects a live job ("" when it does)."""
        same_machine = held.get("boot_id") and held.get("boot_id") == _boot_id() and held.get("host") == socket.gethostname()
        if same_machine and held.get("pid") == os.getpid() and held.get("owner") not in _ACTIVE:
            return "the job in this process that held it has ended"
        if same_machine and isinstance(held.get("pid"), int) and not _alive(held["pid"]):
            return f"its process {held['pid']} on this machine is gone"
        age = time.time() - float(held.get("renewed") or 0.0)
        limit = float(held.get("timeout") or self.timeout)
        if age > limit:
            return f"it was last renewed {age:.0f}s ago (timeout {limit:.0f}s)"
        return ""

    def acquire(self) -> "OutputLease":
        """Take the lease, or raise :class:`LeaseHeld` naming the live holder."""
        self._acquired = datetime.now(timezone.utc).isoformat(timespec="seconds")
        for _ in range(3):
            try:
                storage.create_bytes(self.uri, json.dumps(self._record()).encode(), self.storage_options)
                break
            except FileExistsError:
                held = self._read()
                if held is None:
                    continue  # released between our create and read: try again
                why = self._abandoned(held)
                if not why:
                    raise LeaseHeld(
                        f"another featurization is writing to {self.output!r}: {LEASE} is held by process "
                        f"{held.get('pid')} on {held.get('host')!r} since {held.get('acquired')}, renewed "
                        f"{time.time() - float(held.get('renewed') or 0):.0f}s ago. Wait for it to finish, or write "
                        f"elsewhere; if that job is dead, delete {LEASE} (it is taken over by itself after "
                        f"{float(held.get('timeout') or self.timeout):.0f}s without renewal)"
                    ) from None
                log.warning("taking over the lease on %s: %s", self.output, why)
                if self._read() == held:  # still the abandoned one: remove it, then race for it again
                    storage.delete(self.uri, self.storage_options)
        else:
            raise LeaseHeld(f"could not take the lease on {self.output!r}: other jobs keep taking it")
        _ACTIVE.add(self.owner)
        self._thread = threading.Thread(target=self._renew_loop, name="freezeray-lease", daemon=True)
        self._thread.start()
        return self

    def check(self) -> None:
        """Raise :class:`LeaseLost` unless this job still holds the lease."""
        if self._lost is None:
            held = self._read()
            if held is None or held.get("owner") != self.owner:
                self._lost = "it was deleted" if held is None else f"process {held.get('pid')} on {held.get('host')!r} took it over"
        if self._lost is not None:
            raise LeaseLost(f"lost the lease on {self.output!r} ({self._lost}); this job stops without committing")

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.timeout / 4):
            try:
                self.check()
                storage.write_bytes(self.uri, json.dumps(self._record()).encode(), self.storage_options)
            except LeaseLost:
                return
            except Exception as exc:  # storage trouble: the main loop's own writes will report it
                log.warning("could not renew the lease on %s: %s", self.output, exc)

    def release(self) -> None:
        """Stop renewing and delete the lease if this job still holds it. Best effort: when
        storage is down the lease stays, and the next job takes it over once it sees that
        this process is gone (or after ``timeout``)."""
        self._stop.set()
        _ACTIVE.discard(self.owner)
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            held = self._read()
            if held is not None and held.get("owner") == self.owner:
                storage.delete(self.uri, self.storage_options)
        except Exception as exc:
            log.warning("could not release the lease on %s: %s", self.output, exc)

    def __enter__(self) -> "OutputLease":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def assert_held(output: str, storage_options: dict[str, Any] | None, owner: str) -> None:
    """Raise :class:`LeaseLost` unless the lease on ``output`` is ``owner``'s. The actors
    that write a job's shards call this before each write, so a job judged dead (its lease
    taken over) stops writing even where its driver cannot reach it."""
    try:
        held = json.loads(storage.read_bytes(storage.join(output, LEASE), storage_options))
    except FileNotFoundError:
        held = None
    except ValueError:
        held = {}
    if held is None or held.get("owner") != owner:
        who = "it was deleted" if held is None else f"process {held.get('pid')} on {held.get('host')!r} holds it"
        raise LeaseLost(f"lost the lease on {output!r} ({who}); this job stops writing")
