"""Ray plumbing shared by the pipeline: connecting (quietly, unless asked), reading the
cluster, and turning URIs plus ``storage_options`` into the pyarrow filesystems Ray Data
and Ray Train take.

Quiet by default: when freezeray starts or joins Ray itself (:func:`ensure_ray`), Ray's
own output stays off the terminal: its INFO logging (Ray Data's execution plans and
progress lines, Ray Train's and Tune's notices), Ray Data's progress bars, the workers'
output forwarded to the driver, and the C++ core's log lines on stderr (Ray Data 2.60
logs an ERROR-level notice, "... has constructor arguments in the object store and
max_restarts > 0", for every actor pool it starts: its own ``_MapWorker`` actors always
take their context and transformer as object refs). Python-side logs still go to the
session's log files (Ray Data's ``ray-data.log``). ``FREEZERAY_VERBOSE=1`` or
:func:`set_verbose` shows everything, as Ray prints it by default.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import ray

from freezeray import storage

__all__ = ["ensure_ray", "worker_env", "FORWARDED_PREFIX", "set_verbose", "is_verbose", "quiet_ray", "VERBOSE_ENV", "cluster_gpus", "cluster_cpus",
           "cpu_nodes", "pyarrow_filesystem", "actor_cpus", "ActorPlan", "plan_actors", "actor_memory", "CPU_ACTOR_ENV"]

log = logging.getLogger(__name__)

VERBOSE_ENV = "FREEZERAY_VERBOSE"  # "1": show Ray's own logs, progress bars and worker output
_BACKEND_LOG_LEVEL = "RAY_BACKEND_LOG_LEVEL"  # read by Ray's C++ logger when a process starts
_verbose: bool | None = None  # set_verbose's choice; None: the environment's


def set_verbose(on: bool | None = True) -> None:
    """Show Ray's own output (``on``) or keep it quiet (``False``, the default), for this
    process; the same as ``FREEZERAY_VERBOSE=1``, which it overrides (``None``: follow the
    variable again). Takes effect for Ray's Python logging and progress bars at once; for
    the C++ core's lines and the workers' forwarded output, when freezeray next starts or
    joins Ray.

    Example:
        >>> pipeline.set_verbose()          # Ray's logs and progress bars, as Ray prints them
    """
    global _verbose
    _verbose = None if on is None else bool(on)
    if ray.is_initialized():
        quiet_ray(is_verbose())


def is_verbose() -> bool:
    """Whether Ray's own output is shown: :func:`set_verbose`'s choice, else
    ``FREEZERAY_VERBOSE`` (``1``, ``true`` or ``yes``)."""
    if _verbose is not None:
        return _verbose
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


class _DropNotices(logging.Filter):
    """Notices a user cannot act on: Ray Data's "progress bars disabled" (freezeray shows
    its own progress) and Ray 2.60's token-authentication notice for a local instance."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Progress bars disabled") or "Token authentication is enabled" in message)


_LOUD: dict[str, Any] = {}  # what quiet_ray changed, to restore on set_verbose(True)


def quiet_ray(verbose: bool) -> None:
    """Keep Ray's Python-side output off the terminal unless ``verbose``: its loggers at
    WARNING (Ray Data's console handler too; its file handler keeps everything), the
    notices of :class:`_DropNotices` dropped, Ray Data's progress bars and execution
    banners off. ``verbose`` restores what an earlier call changed."""
    import ray.data  # noqa: F401  (configures Ray Data's loggers, which are tuned here)
    from ray.data import DataContext

    ctx = DataContext.get_current()
    handlers = [h for h in logging.getLogger("ray.data").handlers if "File" not in type(h).__name__]
    if verbose:
        for name, level in _LOUD.pop("levels", {}).items():
            logging.getLogger(name).setLevel(level)
        for handler, level in _LOUD.pop("handlers", []):
            handler.setLevel(level)
        for attr, value in _LOUD.pop("context", {}).items():
            setattr(ctx, attr, value)
        return
    first = "levels" not in _LOUD  # what Ray had is saved once, before the first change
    if first:
        _LOUD["levels"] = {name: logging.getLogger(name).level for name in ("ray", "ray.train", "ray.tune", "ray.air")}
        _LOUD["handlers"] = [(h, h.level) for h in handlers]
        _LOUD["context"] = {"enable_progress_bars": ctx.enable_progress_bars,
                            "print_on_execution_start": ctx.print_on_execution_start}
    for name in _LOUD["levels"]:
        logging.getLogger(name).setLevel(logging.WARNING)
    for handler in handlers:  # Ray Data logs to a file and the console
        handler.setLevel(logging.WARNING)
    for handler in handlers + logging.getLogger("ray").handlers:
        if not any(isinstance(f, _DropNotices) for f in handler.filters):
            handler.addFilter(_DropNotices())
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


@contextlib.contextmanager
def _backend_log_level(level: str | None) -> Iterator[None]:
    """Ray's C++ logging at ``level`` in the processes Ray starts now (unless the user set
    ``RAY_BACKEND_LOG_LEVEL``): the driver's core reads the variable when it starts, and
    the processes of a local instance started now (GCS, raylet, and the workers the
    raylet starts) inherit it, so their C++ log files then hold only fatal errors. The
    variable is restored afterwards.

    Ray announces the setting on stderr before its own sinks exist (``logging.cc``:
    "Set ray log level from environment variable ..."); that one line is dropped here, by
    reading this process's stderr (file descriptor 2) into a temporary file while Ray
    starts and writing every other line back."""
    if level is None or _BACKEND_LOG_LEVEL in os.environ:
        yield
        return
    import sys
    import tempfile

    os.environ[_BACKEND_LOG_LEVEL] = level
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as captured:
            os.dup2(captured.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                captured.seek(0)
                kept = [line for line in captured.read().decode(errors="replace").splitlines(keepends=True)
                        if _BACKEND_LOG_LEVEL not in line]
                sys.stderr.write("".join(kept))
                sys.stderr.flush()
    finally:
        os.close(saved)
        os.environ.pop(_BACKEND_LOG_LEVEL, None)


def ensure_ray(log_to_driver: bool | None = None) -> None:
    """Connect to the cluster in ``RAY_ADDRESS`` or start a new local Ray (without the
    dashboard), unless connected; quietly unless ``log_to_driver`` (None:
    :func:`is_verbose`), as the module docstring says. The Python side (Ray's loggers,
    Ray Data's progress bars) is quieted on a Ray the caller started too; the C++ lines
    and the workers' forwarded output follow how that Ray was started."""
    loud = is_verbose() if log_to_driver is None else bool(log_to_driver)
    quiet_ray(loud)
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    log.info("connecting to Ray at %s", address or "a new local instance")
    with _backend_log_level(None if loud else "fatal"):
        # "local": a new instance, as documented; Ray's own default (None) would join whatever
        # cluster /tmp/ray/ray_current_cluster names, even one that is gone (minutes of retries)
        ray.init(address=address or "local", ignore_reinit_error=True, include_dashboard=False if not address else None,
                 log_to_driver=loud, logging_level=logging.INFO if loud else logging.WARNING)


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


FORWARDED_PREFIX = "FREEZERAY_"  # the driver's settings of this prefix reach the tasks and actors freezeray starts


def worker_env(extra: dict[str, str] | None = None) -> dict[str, Any]:
    """Ray remote options (``runtime_env`` env_vars) giving the tasks and actors freezeray
    starts the driver's ``FREEZERAY_*`` settings, and ``extra``; ``{}`` when there are none.

    Ray does not pass a driver's environment to its workers: on a cluster they have the
    environment their raylet started with, and a local instance's workers the one of the
    process that started it. So a setting such as ``FREEZERAY_IO_RETRY_SECONDS`` made in the
    driver (or changed after Ray started) would hold for the driver's own storage calls
    and not for the actors writing shards. Forwarded, every part of a run follows the
    driver's settings. Ray keeps separate worker processes per distinct environment, so a
    run with no such settings starts no extra processes.
    """
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_PREFIX)}
    env.update(extra or {})
    return {"runtime_env": {"env_vars": env}} if env else {}


@dataclass(frozen=True)
class ActorPlan:
    """How many model actors to run and what each one gets."""

    actors: int  # size of the actor pool
    gpus: float  # GPUs per actor (0 on CPU)
    cpus: float  # CPUs Ray reserves per actor (logical)
    threads: int | None  # torch intra-op threads per CPU actor (None on GPU)
    decode_cpus: float = 1.0  # CPUs each read/decode task asks for (less on 1-CPU nodes, so they still fit)
    # environment of the actor processes (Ray's runtime_env env_vars), read when torch loads its
    # OpenMP runtime: CPU actors get CPU_ACTOR_ENV (see plan_actors)
    env: dict[str, str] = field(default_factory=dict)


# OpenMP threads that wait at the end of a parallel region sleep at once instead of spinning
# (libgomp, which torch's Linux wheels use, spins for a while by default): see plan_actors.
CPU_ACTOR_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def plan_actors(resources: Any = None) -> ActorPlan:
    """The model actors of a featurize/evaluate/predict step: what ``resources`` (a
    :class:`~pipeline.Resources`) leaves open is filled in.

    With GPUs in the cluster (or ``use_gpu``), one actor per GPU. On CPU-only clusters,
    one actor per node whose torch threads use the node's cores: measured on 2 and 16
    cores, several single-threaded actors on a node were no faster in steady state
    (within the ±15% run-to-run noise of those machines) and each one adds its start-up.
    CPU reservations leave one CPU per node for the decode tasks; on nodes with a single
    CPU the actor reserves a quarter and the decode tasks three quarters (both would wait
    for each other forever if each asked for a whole CPU).

    Threads that do not fight (issue 24): the actor runs as many torch threads as the node
    has CPUs (the CPUs Ray reserves for it plus the one its decode tasks get), and the
    actors' OpenMP threads wait passively (:data:`CPU_ACTOR_ENV`), so that a decode task that
    needs its core takes it at once and the model has every core the rest of the time. With
    torch's default (threads spin at every barrier) and a thread per core, anything else
    runnable on the node (a decode task, another process) stalls every parallel region of the
    forward pass. Measured on this project's 2-core machine (``featurize`` of 1,000-2,000
    JPEGs, efficientnet_lite0 at 224 px, images/s; benchmarks/README.md "Featurization
    throughput"):

    * side by side in one run, passive waits, the node's threads against the reserved CPU's
      one thread: 38.2 vs 21.3 (busy machine), 16.7 vs 12.8 (quiet, slower host): 1.79x and
      1.30x; the node's threads are the default since;
    * earlier, loaded machine (load 5-17), four rounds, spinning (torch's default): the model
      alone 7.7 and 6.2 with 2 threads, 29.7 and 18.3 with 1; featurize 7.9, 6.1, 22.5, 14.5
      with 2 threads, 17.2, 14.8, 23.0, 23.2 with 1; passive: the model alone 20.0 and 25.7
      with 2 threads, 15.5 and 24.1 with 1; featurize 12.7, 11.0, 21.6 with 2 threads, 16.2,
      17.2, 26.3 with 1 (passive waits are what made two threads bearable).

    Decoding inside the actors instead (``decode="gpu"``'s path on the CPU) gave 19.5
    against 26.3 for one thread and tasks. ``Resources(threads_per_worker=N)`` sets the
    threads.
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
        threads = r.threads_per_worker or max(1, int(per_node))  # the node's CPUs: decode tasks take theirs when they run
        return ActorPlan(len(nodes), 0.0, cpus, threads, decode, dict(CPU_ACTOR_ENV))
    num_actors = r.num_workers if r.num_workers is not None else max(1, int(cluster_gpus() // gpus))
    if num_actors <= 0:
        raise ValueError(f"num_workers must be a positive integer for model actors, got {num_actors!r}")
    cpus = r.cpus_per_worker if r.cpus_per_worker is not None else actor_cpus(num_actors, gpus > 0)
    threads = None if gpus > 0 else (r.threads_per_worker or max(1, int(cpus)))
    return ActorPlan(num_actors, gpus, cpus, threads, env={} if gpus > 0 else dict(CPU_ACTOR_ENV))


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
