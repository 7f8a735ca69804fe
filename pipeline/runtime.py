"""Ray plumbing shared by the pipeline: connecting, reading the cluster, and turning
URIs plus ``storage_options`` into the pyarrow filesystems Ray Data and Ray Train take."""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import ray

from surgery import storage

__all__ = ["ensure_ray", "cluster_gpus", "cluster_cpus", "pyarrow_filesystem", "actor_cpus"]

log = logging.getLogger(__name__)


def ensure_ray() -> None:
    """Connect to the cluster in ``RAY_ADDRESS`` or start a local Ray, unless connected."""
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        log.info("connecting to Ray at %s", address or "a new local instance")
        ray.init(address=address, ignore_reinit_error=True, include_dashboard=False if not address else None)


def cluster_gpus() -> float:
    ensure_ray()
    return float(ray.cluster_resources().get("GPU", 0.0))


def cluster_cpus() -> float:
    ensure_ray()
    return float(ray.cluster_resources().get("CPU", 1.0))


def actor_cpus(num_actors: int, gpu: bool, reserve: float = 1.0) -> float:
    """CPUs to reserve per model actor: 1 with a GPU; on CPU-only clusters, what is left
    after ``reserve`` CPUs for decoding, shared by the actors (at least 0.25 each)."""
    if gpu:
        return 1.0
    free = max(0.25 * num_actors, cluster_cpus() - reserve)
    return max(0.25, math.floor(4 * free / num_actors) / 4)


def pyarrow_filesystem(uri: str, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    """``(filesystem, path)`` for Ray Data readers and Ray Train storage: None and a local
    path for local URIs, else fsspec wrapped as a pyarrow filesystem and the bare path."""
    if storage.is_local(uri):
        return None, os.path.abspath(uri.removeprefix("file://"))
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = storage.filesystem(uri, storage_options)
    return PyFileSystem(FSSpecHandler(fs)), path
