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

__all__ = ["ensure_ray", "cluster_gpus", "cluster_cpus", "cpu_nodes", "pyarrow_filesystem", "actor_cpus", "ActorPlan", "plan_actors",
           "actor_memory"]

log = logging.getLogger(__name__)


def ensure_ray(log_to_driver: bool = True) -> None:
    """Connect to the cluster in ``RAY_ADDRESS`` or start a local Ray (without the
    dashboard), unless connected. ``log_to_driver``: show the workers' output here (and
    Ray's own INFO notices; without it they go to Ray's log files only)."""
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        log.info("connecting to Ray at %s", address or "a new local instance")
        ray.init(address=address, ignore_reinit_error=True, include_dashboard=False if not address else None,
                 log_to_driver=log_to_driver, logging_level=logging.INFO if log_to_driver else logging.WARNING)


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
    decode_cpus: float = 1.0  # CPUs each read/decode task asks for (less on 1-CPU nodes, so they still fit)


def plan_actors(resources: Any = None) -> ActorPlan:
    """The model actors of a featurize/evaluate/predict step: what ``resources`` (a
    :class:`~pipeline.Resources`) leaves open is filled in.

    With GPUs in the cluster (or ``use_gpu``), one actor per GPU. On CPU-only clusters,
    one actor per node whose torch threads use the node's CPUs: measured on 2 and 16
    cores, several single-threaded actors on a node were no faster in steady state
    (within the ±15% run-to-run noise of those machines) and each one adds its start-up.
    CPU reservations leave one CPU per node for the decode tasks; on nodes with a single
    CPU the actor reserves a quarter and the decode tasks three quarters (both would wait
    for each other forever if each asked for a whole CPU).
    """
    from .resources import Resources

    r = resources if resources is not None else Resources()
    if r.gpus_per_worker is not None:
        gpus = float(r.gpus_per_worker)
    elif r.use_gpu is None:
        gpus = 1.0 if cluster_gpus() > 0 else 0.0
    else:
        gpus = 1.0 if r.use_gpu else 0.0
    if r.num_workers is None and gpus == 0:
        nodes = cpu_nodes()
        per_node = min(nodes)
        cpus = r.cpus_per_worker if r.cpus_per_worker is not None else max(0.25, per_node - 1.0)
        decode = max(0.25, min(1.0, per_node - cpus))
        return ActorPlan(len(nodes), 0.0, cpus, r.threads_per_worker or max(1, int(per_node)), decode)
    num_actors = r.num_workers if r.num_workers is not None else max(1, int(cluster_gpus() // gpus))
    if num_actors <= 0:
        raise ValueError(f"num_workers must be a positive integer for model actors, got {num_actors!r}")
    cpus = r.cpus_per_worker if r.cpus_per_worker is not None else actor_cpus(num_actors, gpus > 0)
    threads = None if gpus > 0 else (r.threads_per_worker or max(1, int(cluster_cpus() // num_actors)))
    return ActorPlan(num_actors, gpus, cpus, threads)


def pyarrow_filesystem(uri: str, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    """``(filesystem, path)`` for Ray Data readers and Ray Train storage: None and a local
    path for local URIs, else fsspec wrapped as a pyarrow filesystem and the bare path."""
    if storage.is_local(uri):
        return None, os.path.abspath(uri.removeprefix("file://"))
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = storage.filesystem(uri, storage_options)
    return PyFileSystem(FSSpecHandler(fs)), path


def actor_memory(frozen: Any, config: Any, batch_size: int) -> int:
    """Bytes a model actor needs, declared to Ray: its process with torch imported (about
    1.25 GiB with headroom), the graph's tensors twice (loading copies them), and
    activations for one batch of images (taken as twelve float copies of the input; none
    for feature inputs). Measured peak: 1.2 to 1.3 GiB for efficientnet_lite0 at 224 px and
    batch 64, for which Ray Data asks for 1.5 to 1.7 GiB; this gives 1.75 GiB."""
    tensors = sum(t.numel() * t.element_size() for t in frozen.state_dict().values())
    activations = 12 * 4 * batch_size * math.prod(config.input_size) if config is not None else 0
    return int(1.25 * 2**30 + 2 * tensors + activations)
