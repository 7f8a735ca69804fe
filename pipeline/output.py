"""The driver's side of writing a committed output, shared by featurize and predict: plan
by input shard, take the lease, compute what is missing with the model actors, seal each
shard as it completes, commit a new version, clean up (the protocol is described in
:mod:`pipeline.shards`).

The driver holds the plan (a few hundred bytes per shard; loose files: their listing),
one coverage bitmap per shard being computed, and the manifest entries; rows and their
values stay in the Ray tasks and actors that read and compute them.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

import pyarrow as pa

from freezeray import storage

from .commit import clean, commit_version, done_shards, latest, rewrite, seal
from .lease import OutputLease
from .manifest import Shard, parse_manifest, probe_problem
from .plan import Plan, PlannedShard, plan_output
from .shards import ATTEMPT, INPUTS, Tracker, read_json, write_json, write_table
from .sources import ImageSource

__all__ = ["OutputJob", "Written", "write_output", "committed_manifest", "classes_of", "Progress", "unwrapped"]

log = logging.getLogger(__name__)

Progress = Callable[[int, int, int], None]  # (shard, rows, errors), on the driver, as each shard is sealed
_SEALS_IN_FLIGHT = 8


@dataclass(frozen=True)
class OutputJob:
    """One output being written: where, under which fingerprint, and how."""

    output: str  # the output folder URI
    storage_options: dict[str, Any] | None  # fsspec options for it (never logged)
    fingerprint: str  # what is computed: same fingerprint -> reuse or extend, another -> refuse or overwrite
    what: str  # "features" or "predictions", for messages
    overwrite: bool = False  # replace an output of another fingerprint
    lease_timeout: float = 300.0
    shard_rows: int = 4096  # loose files per shard
    probe: list[float] | None = None  # a sample of what the computation gives on a fixed input (manifest.probe_sample)


@dataclass
class Written:
    """What a run did, for the manifest."""

    entries: list[Shard]  # every shard of the new version, in plan order
    plan: Plan
    version: int
    computed: int  # shards the model computed in this run
    rows: int  # rows computed in this run (good + errors)
    seconds: float
    committed: Any  # the version this one follows (any fingerprint), or None
    classes: tuple[str, ...]


def committed_manifest(job: OutputJob) -> tuple[dict[str, Any] | None, Any]:
    """(the newest committed version as data, parsed) of ``job.output``; another kind or
    another fingerprint is refused unless ``job.overwrite``.

    Raises:
        FileExistsError: the output holds another fingerprint's (or another kind's) rows.
    """
    data = latest(job.output, job.storage_options)
    if data is None:
        return None, None
    manifest = parse_manifest(data)
    kind = "predictions" if manifest.format.startswith("freezeray.predictions") else "features"
    if (manifest.fingerprint != job.fingerprint or kind != job.what) and not job.overwrite:
        raise FileExistsError(
            f"{job.output!r} already holds {kind} with fingerprint {manifest.fingerprint}, "
            f"but this run's fingerprint is {job.fingerprint} (another model, preprocessing or dtype); "
            "pass overwrite=True to replace them, or choose another output"
        )
    problem = probe_problem(job.probe, manifest.probe) if job.probe is not None and kind == job.what else ""
    if problem and not job.overwrite:
        raise FileExistsError(
            f"{job.output!r} holds {kind} of the same model and settings (fingerprint {job.fingerprint}), but the model "
            f"now computes other values ({problem}: a library upgrade changed its numbers); adding to them would mix "
            "the two. Pass overwrite=True to compute them all again, or choose another output"
        )
    return data, manifest


def write_output(job: OutputJob, src: ImageSource, compute: Callable[[Any, dict[str, Any], int], Any], schema: pa.Schema,
                 finish: Callable[[Written], Any], progress: Progress | None = None) -> tuple[Any, bool]:
    """Bring ``job.output`` up to date with ``src``: returns (the committed manifest, whether
    it was reused as it was). ``compute(shards, writer, stride)`` returns the Ray Dataset of
    the model actors' slice summaries for these shards (see :func:`rows_dataset`;
    ``writer``: a :class:`~pipeline.shards.SliceWriter` as a dict); ``schema`` is the shard files' Arrow schema; ``finish`` builds the manifest."""
    data, committed = committed_manifest(job)
    same = committed if committed is not None and committed.fingerprint == job.fingerprint else None
    plan = plan_output(src, job.fingerprint, same, job.shard_rows, job.output, job.storage_options)
    if same is not None and plan.unchanged:
        log.info("%s at %s are up to date (fingerprint %s, version %d): reusing them, nothing recomputed",
                 job.what, job.output, job.fingerprint, same.version)
        return same, True
    with OutputLease(job.output, job.storage_options, job.lease_timeout) as lease:
        data, committed = committed_manifest(job)  # again, now that we hold the lease
        same = committed if committed is not None and committed.fingerprint == job.fingerprint else None
        plan = plan_output(src, job.fingerprint, same, job.shard_rows, job.output, job.storage_options)
        if same is not None and plan.unchanged:
            return same, True
        _begin(job)
        started = time.perf_counter()
        entries, computed, rows = _execute(job, src, plan, compute, schema, lease, progress)
        lease.check()
        written = Written(entries, plan, (committed.version + 1) if committed is not None else 1, computed, rows,
                          time.perf_counter() - started, committed, tuple(src.classes))
        manifest = finish(written)
        commit_version(job.output, manifest, job.storage_options, job.what)
    deleted = clean(job.output, job.storage_options, [manifest.to_dict(), data if same is not None else None])
    log.info("committed version %d of the %s at %s: %d shards (%d computed, %d kept, %d rewritten, %d dropped); "
             "%d old files deleted", manifest.version, job.what, job.output, len(entries), computed,
             len(plan.of("keep")), len(plan.of("rewrite")), len(plan.dropped), deleted)
    return manifest, False


def _begin(job: OutputJob) -> None:
    """The attempt record: an unfinished run of another fingerprint is refused unless
    ``overwrite`` (its files are then left for :func:`~pipeline.shards.clean`)."""
    attempt = read_json(storage.join(job.output, ATTEMPT), job.storage_options)
    if attempt is not None and attempt.get("fingerprint") != job.fingerprint and not job.overwrite:
        raise FileExistsError(f"{job.output!r} holds unfinished {job.what} with fingerprint {attempt.get('fingerprint')}, "
                              f"not this run's {job.fingerprint}; pass overwrite=True to discard them, or choose "
                              "another output")
    if attempt is None or attempt.get("fingerprint") != job.fingerprint:
        write_json(storage.join(job.output, ATTEMPT), {"fingerprint": job.fingerprint,
                                                        "started": datetime.now(timezone.utc).isoformat(timespec="seconds")},
                   job.storage_options)


def _execute(job: OutputJob, src: ImageSource, plan: Plan, compute: Callable[[Any, dict[str, Any], int], Any],
             schema: pa.Schema, lease: OutputLease, progress: Progress | None) -> tuple[list[Shard], int, int]:
    """Every planned shard's entry: kept ones as they are, rewritten and computed ones once
    their files are written. Returns (entries, shards computed, rows computed)."""
    _write_lists(job, plan)
    entries: dict[int, dict[str, Any]] = {s.number: s.kept.to_dict() for s in plan.of("keep") if s.kept is not None}
    todo = plan.of("compute")
    entries.update(done_shards(job.output, job.storage_options, [s.entry() for s in todo]))
    if len(entries) > len(plan.of("keep")):
        log.info("resuming the %s at %s: %d of %d shards to compute were written by an earlier run", job.what,
                 job.output, len(entries) - len(plan.of("keep")), len(todo))
    remaining = [s for s in todo if s.number not in entries]
    rows = 0
    if plan.of("rewrite") or remaining:
        from .runtime import ensure_ray

        ensure_ray()
        pending = _rewrites(job, plan)
        if remaining:
            rows = _compute(job, src, plan, remaining, compute, schema, lease, progress, entries)
        for done in _gather(pending):
            entries[int(done["shard"])] = done
    ordered = [Shard.from_dict(entries[s.number]) for s in plan.shards]
    return ordered, len(remaining), rows


def _write_lists(job: OutputJob, plan: Plan) -> None:
    """The input lists of new and rewritten loose-file shards (before any row is computed, so
    that a resumed run finds them)."""
    lists = [s for s in plan.shards if s.members is not None and s.action != "keep"]

    def one(s: PlannedShard) -> None:
        uri = storage.join(job.output, s.input.uri)
        if not storage.exists(uri, job.storage_options):
            write_table(uri, s.members, job.storage_options)  # type: ignore[arg-type]

    if lists:
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(one, lists))
    log.debug("wrote %d input lists under %s/%s", len(lists), job.output, INPUTS)


def _rewrites(job: OutputJob, plan: Plan) -> list[Any]:
    """Ray tasks writing the shards that change without model work (files gone, classes changed)."""
    import ray

    from .runtime import worker_env

    task = ray.remote(num_cpus=0, max_retries=3, **worker_env())(rewrite)
    out = []
    for s in plan.of("rewrite"):
        assert s.kept is not None
        ids = None if s.keep_ids is None else [int(v) for v in s.keep_ids]
        out.append(task.remote(job.output, job.storage_options, s.kept.to_dict(), s.entry(), ids, plan.label_map))
    return out


def _gather(refs: list[Any]) -> list[dict[str, Any]]:
    import ray

    try:
        return ray.get(refs) if refs else []
    except Exception as exc:
        raise unwrapped(exc) from exc


def _compute(job: OutputJob, src: ImageSource, plan: Plan, todo: list[PlannedShard],
             compute: Callable[[Any, dict[str, Any], int], Any],
             schema: pa.Schema, lease: OutputLease, progress: Progress | None, entries: dict[int, dict[str, Any]]) -> int:
    """Compute ``todo`` with the model actors, sealing each shard as its last slice arrives."""
    import ray

    from .runtime import worker_env
    from .shards import SliceWriter

    if src.sharded:
        by_uri = {s.uri: s for s in src.shards}
        shards: list[tuple[int, Any]] = [(s.number, by_uri[s.input.uri]) for s in todo]
    else:
        shards = [(s.number, s.members) for s in todo]
    writer = SliceWriter(job.output, job.storage_options, tuple(schema.names), lease.owner)
    summaries = compute(shards, writer.to_dict(), plan.stride)
    tracker = Tracker({s.number: None for s in todo})
    planned = {s.number: s for s in todo}
    sealer = ray.remote(num_cpus=0, max_retries=3, **worker_env())(seal)
    schema_bytes = schema.serialize().to_pybytes()
    in_flight: dict[Any, int] = {}
    rows = 0

    def collect(block: bool) -> None:
        nonlocal rows
        while in_flight and (block or len(in_flight) >= _SEALS_IN_FLIGHT or ray.wait(list(in_flight), timeout=0)[0]):
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            number = in_flight.pop(ready[0])
            entry = _gather([ready[0]])[0]
            entries[number] = entry
            rows += int(entry["rows"]) + int(entry["errors"])
            if progress is not None:
                progress(number, int(entry["rows"]), int(entry["errors"]))

    try:
        for batch in summaries.iter_batches(batch_size=None, batch_format="numpy"):
            for number, keep, nodes, total in tracker.add(batch):
                entry = {**planned[number].entry(), "nodes": [n for n in nodes if n]}
                options = _near(nodes[0]) if nodes and nodes[0] else {}
                ref = sealer.options(**options).remote(job.output, job.storage_options, entry, keep, total, plan.stride,
                                                       schema_bytes, lease.owner)
                in_flight[ref] = number
            collect(block=False)
        collect(block=True)
    except Exception as exc:
        raise unwrapped(exc) from exc
    finally:  # a run that stops (an error, an interrupt) lets the seals it started finish: what it leaves is settled
        if in_flight:
            ray.wait(list(in_flight), num_returns=len(in_flight), timeout=60)
    if tracker.unfinished:
        raise RuntimeError(f"the {job.what} run ended with shards {tracker.unfinished[:10]} incomplete")
    return rows


def _near(node: str) -> dict[str, Any]:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node, soft=True)}


def unwrapped(exc: BaseException) -> BaseException:
    """The exception a user can act on inside Ray's wrappers (a storage outage, a lost
    lease, a bad source; Ray keeps the original as ``cause``), else ``exc``."""
    from freezeray.storage import StorageUnavailable

    from .lease import LeaseLost
    from .sources import SourceError

    seen: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and not any(e is s for s in seen):
        seen.append(e)
        if type(e) in (StorageUnavailable, LeaseLost, SourceError):
            return e
        cause = getattr(e, "cause", None)
        e = cause if isinstance(cause, BaseException) else (e.__cause__ or e.__context__)
    return exc


def classes_of(src: ImageSource, entries: list[Shard]) -> tuple[str, ...]:
    """The classes of a committed output: the source's, or for integer labels only seen
    while reading (tar shards), ``0..`` the largest label any shard holds."""
    if src.classes:
        return tuple(src.classes)
    top = max((s.label_max for s in entries), default=-1)
    return tuple(str(i) for i in range(top + 1))
