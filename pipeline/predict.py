"""``pipeline.predict``: batch inference from raw images to committed Parquet shards
(one row per readable input: row_id, path, label when known, predicted, class_name,
probabilities), an errors table, and a manifest written last.

It follows featurization's commit protocol (:mod:`pipeline.shards`): the scoring actors
write their rows where they run, one job at a time holds the output's lease, the manifest
is created exclusively, an interrupted run resumes its incomplete shards, a committed
output with the same fingerprint (the whole model's, the preprocessing and the input
listing) is reused, and one with another fingerprint is refused unless ``overwrite``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import torch.fx as fx

import surgery
from surgery import storage
from surgery.preprocess import model_preprocessing

from .lease import OutputLease
from .manifest import PREDICTIONS_FORMAT, PredictionsManifest, ShardPlan, SourceInfo
from .resources import Resources
from .shards import (
    ATTEMPT,
    ERRORS,
    MANIFEST,
    PartWriter,
    Slices,
    assemble,
    clear,
    delete_slices,
    existing_slices,
    gather_errors,
    read_json,
    unlisted,
    write_json,
    write_table,
)
from .sources import ImageSource, read_images

__all__ = ["predict", "PredictResult"]

log = logging.getLogger(__name__)

_COLUMNS = ("row_id", "path", "label", "predicted", "class_name", "probabilities")


@dataclass
class PredictResult:
    output: str  # folder with shards/, errors.parquet and manifest.json
    rows: int  # predictions written (one per readable input)
    errors: int  # inputs that could not be read
    seconds: float
    manifest: PredictionsManifest | None = field(repr=False, default=None)
    reused: bool = False  # the output already held these predictions


def _fingerprint(model_fp: str, preprocessing: dict, listing: str) -> str:
    h = hashlib.sha256(b"freezeray.predict/1\n")
    h.update(json.dumps({"model": model_fp, "preprocessing": preprocessing, "listing": listing}, sort_keys=True).encode())
    return h.hexdigest()[:32]


def predict(
    model: fx.GraphModule,
    source: str | ImageSource,
    output: str,
    *,
    storage_options: dict[str, Any] | None = None,
    batch_size: int = 64,
    resources: Resources | None = None,
    image_size: int | None = None,
    shard_rows: int = 4096,
    overwrite: bool = False,
    lease_timeout: float = 300.0,
) -> PredictResult:
    """Batch inference from raw images to Parquet under ``output``.

    Returns:
        a :class:`PredictResult`; an output that already holds these predictions (the same
        model, preprocessing and images) is returned as it is (``reused``).

    Raises:
        FileExistsError: ``output`` holds other predictions (and not ``overwrite``).
        LeaseHeld: another live job is writing to ``output``.
    """
    from .evaluate import _scored

    started = time.perf_counter()
    src = source if isinstance(source, ImageSource) else read_images(source, storage_options)
    info = surgery.get_info(model)
    class_names = tuple(info.classes or src.classes)
    config = model_preprocessing(model, None, image_size)
    fp = _fingerprint(surgery.fingerprint(model), config.to_dict(), src.listing_hash())
    committed = read_json(storage.join(output, MANIFEST), storage_options)
    if committed is not None and committed.get("fingerprint") == fp:
        manifest = PredictionsManifest.from_dict(committed)
        return PredictResult(output, manifest.rows, manifest.errors, time.perf_counter() - started, manifest, True)
    with OutputLease(output, storage_options, lease_timeout) as lease:
        plan = ShardPlan(total=len(src), rows_per_shard=shard_rows)
        pending, resumed = _prepare(output, storage_options, fp, plan, committed, overwrite)
        shard_ids = plan.shard_of(np.arange(len(src)))
        table = src.table.append_column("shard", pa.array(shard_ids.astype(np.int64))).filter(
            pa.array(np.isin(shard_ids, pending)))
        slices = Slices()
        if table.num_rows:
            writer = PartWriter(output, storage_options, _COLUMNS, lease.owner, class_names)
            ds, _, _ = _scored(model, ImageSource(src.uri, table, src.classes, src.layout, src.storage_options),
                               storage_options, batch_size, resources, image_size, None, writer=writer.to_dict())
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                _track(slices, batch)
        lease.check()
        complete, incomplete, redundant = assemble(plan, Slices({**resumed.by_shard, **slices.by_shard}),
                                                   range(plan.count))
        if incomplete:
            raise RuntimeError(f"prediction ended with shards {incomplete[:10]} incomplete")
        shards = [complete[i] for i in range(plan.count)]
        delete_slices(output, storage_options, redundant + unlisted(output, storage_options, shards))
        errors = gather_errors(output, storage_options, shards)
        write_table(storage.join(output, ERRORS), errors, storage_options)
        seconds = time.perf_counter() - started
        rows = sum(s.rows for s in shards)
        manifest = PredictionsManifest(
            format=PREDICTIONS_FORMAT, fingerprint=fp, model=info.name, model_fingerprint=surgery.fingerprint(model),
            classes=list(class_names), source=SourceInfo(uri=src.uri, layout=src.layout, rows=len(src),
                                                         listing_hash=src.listing_hash()),
            rows=rows, errors=int(errors.num_rows), errors_file=ERRORS, shards=shards, plan=plan,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"), seconds=round(seconds, 3),
            images_per_s=round(rows / seconds, 2) if seconds > 0 and rows else None,
        )
        try:
            storage.create_bytes(storage.join(output, MANIFEST),
                                 json.dumps(manifest.to_dict(), indent=2, sort_keys=True).encode(), storage_options)
        except FileExistsError:
            raise FileExistsError(f"another job committed predictions at {output!r} first") from None
        storage.delete(storage.join(output, ATTEMPT), storage_options)
    log.info("predicted %d images (%d errors) in %.1fs -> %s", rows, errors.num_rows, seconds, output)
    return PredictResult(output, rows, int(errors.num_rows), seconds, manifest)


def _track(slices: Slices, batch: dict[str, np.ndarray]) -> None:
    shards, keys, ok = np.asarray(batch["shard"]), np.asarray(batch["slice"], dtype=object), np.asarray(batch["ok"])
    ids, sizes, nodes = np.asarray(batch["row_id"]), np.asarray(batch["bytes"]), np.asarray(batch["node"], dtype=object)
    for sid in np.unique(shards):
        for key in np.unique(keys[shards == sid]):
            m = (shards == sid) & (keys == key)
            if str(key) not in slices.by_shard.get(int(sid), {}):
                slices.add(int(sid), str(key), ids[m & ok], ids[m & ~ok], int(sizes[m].sum()), str(nodes[m][0]))


def _prepare(output: str, storage_options: dict | None, fp: str, plan: ShardPlan, committed: dict | None,
             overwrite: bool) -> tuple[list[int], Slices]:
    if committed is not None or (read_json(storage.join(output, ATTEMPT), storage_options) or {}).get("fingerprint") \
            not in (None, fp):
        if not overwrite:
            raise FileExistsError(f"{output!r} already holds predictions of another model or input (fingerprint "
                                  f"{(committed or {}).get('fingerprint')}); pass overwrite=True or choose another output")
        clear(output, storage_options)
    attempt = read_json(storage.join(output, ATTEMPT), storage_options)
    if attempt is None or attempt.get("plan") != plan.to_dict():
        clear(output, storage_options)
        write_json(storage.join(output, ATTEMPT), {"fingerprint": fp, "plan": plan.to_dict()}, storage_options)
        return list(range(plan.count)), Slices()
    found = existing_slices(output, storage_options)
    complete, incomplete, redundant = assemble(plan, found, range(plan.count))
    delete_slices(output, storage_options, [(s, k) for s in incomplete for k in found.by_shard.get(s, {})] + redundant)
    return sorted(incomplete), found.only(complete.values())
