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
    ERRORS,
    MANIFEST,
    PartWriter,
    Slices,
    commit_manifest,
    prepare_output,
    read_json,
    settle,
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
        pending, resumed = prepare_output(output, storage_options, fp, plan, committed, overwrite, "predictions")
        shard_ids = plan.shard_of(np.arange(len(src)))
        table = src.table.append_column("shard", pa.array(shard_ids.astype(np.int64))).filter(
            pa.array(np.isin(shard_ids, pending)))
        slices = Slices()
        if table.num_rows:
            writer = PartWriter(output, storage_options, _COLUMNS, lease.owner, class_names)
            ds, _, _ = _scored(model, ImageSource(src.uri, table, src.classes, src.layout, src.storage_options),
                               storage_options, batch_size, resources, image_size, None, writer=writer.to_dict())
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                slices.add_summaries(batch)
        lease.check()
        shards, errors = settle(output, storage_options, plan, Slices({**resumed.by_shard, **slices.by_shard}), "prediction")
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
        commit_manifest(output, manifest, storage_options, "predictions")
    log.info("predicted %d images (%d errors) in %.1fs -> %s", rows, errors.num_rows, seconds, output)
    return PredictResult(output, rows, int(errors.num_rows), seconds, manifest)
