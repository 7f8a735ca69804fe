"""Ray plumbing shared by the pipeline: connecting, reading the cluster, and turning
URIs plus ``storage_options`` into the pyarrow filesystems Ray Data and Ray Train take."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import ray

from surgery import storage

__all__ = ["ensure_ray", "cluster_gpus", "cluster_cpus", "cpu_nodes", "pyarrow_filesystem", "actor_cpus", "ActorPlan", "plan_actors"]

log = logging.getLogger(__name__)


def ensure_ray(log_to_driver: bool = True) -> None:
    """Connect to the cluster in ``RAY_ADDRESS`` or start a local Ray (without the
    dashboard), unless connected. ``log_to_driver``: show the workers' output here."""
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        log.info("connecting to Ray at %s", address or "a new local instance")
        ray.init(address=address, ignore_reinit_error=True, include_dashboard=False if not address else None,
                 log_to_driver=log_to_driver)


def cluster_gpus() -> float:
    ensure_ray()
    return float(ray.cluster_resources().get("GPU", 0.0))


def cluster_cpus() -> float:
    ensure_ray()
    return float(ray.cluster_resources().get("CPU", 1.0))


def cpu_nodes() -> list[float]:
    """CPUs of each alive node that has any (a head started with ``CPU: 0`` is left out)."""
    ensure_ray()
    cpus = [float(n["Resources"].get("CPU", 0.0)) for n in ray.nodes() if n.get("Alive")]
    return [c for c in cpus if c > 0] or [cluster_cpus()]


def actor_cpus(num_actors: int, gpu: bool, reserve: float = 1.0) -> float:
    """CPUs to reserve per model actor: 1 with a GPU; on CPU-only clusters, what is left
    after ``reserve`` CPUs for decoding, shared by the actors (at least 0.25 each)."""
    if gpu:
        return 1.0
    free = max(0.25 * num_actors, cluster_cpus() - reserve)
    return max(0.25, math.floor(4 * free / num_actors) / 4)


@dataclass(frozen=True)
class ActorPlan:
    """How many model actors to run and what each one gets."""

    actors: int  # size of the actor pool
    gpus: float  # GPUs per actor (0 on CPU)
    cpus: float  # CPUs Ray reserves per actor (logical)
    threads: int | None  # torch intra-op threads per CPU actor (None on GPU)


def plan_actors(num_actors: int | None, num_gpus: float | None, cpus_per_actor: float | None,
                threads_per_actor: int | None) -> ActorPlan:
    """Fill in what the caller left open.

    With GPUs in the cluster (or ``num_gpus`` given), one actor per GPU. On CPU-only
    clusters, one actor per node whose torch threads use the node's CPUs: measured on 2
    and 16 cores, several single-threaded actors on a node were no faster in steady state
    (within the ±15% run-to-run noise of those machines) and each one adds its start-up.
    CPU reservations leave one CPU per node for the decode tasks.
    """
    gpus = (1.0 if cluster_gpus() > 0 else 0.0) if num_gpus is None else float(num_gpus)
    if num_actors is None and gpus == 0:
        nodes = cpu_nodes()
        per_node = min(nodes)
        cpus = cpus_per_actor if cpus_per_actor is not None else max(0.25, per_node - 1.0)
        return ActorPlan(len(nodes), 0.0, cpus, threads_per_actor or max(1, int(per_node)))
    if num_actors is None:
        num_actors = max(1, int(cluster_gpus() // gpus))
    if not isinstance(num_actors, int) or isinstance(num_actors, bool) or num_actors <= 0:
        raise ValueError(f"num_actors must be a positive integer, got {num_actors!r}")
    cpus = cpus_per_actor if cpus_per_actor is not None else actor_cpus(num_actors, gpus > 0)
    threads = None if gpus > 0 else (threads_per_actor or max(1, int(cluster_cpus() // num_actors)))
    return ActorPlan(num_actors, gpus, cpus, threads)


def pyarrow_filesystem(uri: str, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    """``(filesystem, path)`` for Ray Data readers and Ray Train storage: None and a local
    path for local URIs, else fsspec wrapped as a pyarrow filesystem and the bare path."""
    if storage.is_local(uri):
        return None, os.path.abspath(uri.removeprefix("file://"))
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = storage.filesystem(uri, storage_options)
    return PyFileSystem(FSSpecHandler(fs)), path
