"""``pipeline.predict``: batch inference from raw images to committed Parquet shards
(one row per readable input), an errors table, and a manifest written last."""

from __future__ import annotations

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

from .evaluate import _scored
from .resources import Resources
from .shards import (
    ERRORS,
    MANIFEST,
    ShardPlan,
    ShardWriter,
    clear,
    gather_errors,
    read_json,
    shard_path,
    write_json,
    write_table,
)
from .sources import ImageSource, read_images

__all__ = ["predict", "PredictResult"]

log = logging.getLogger(__name__)


@dataclass
class PredictResult:
    output: str  # folder with shards/, errors.parquet and manifest.json
    rows: int  # predictions written (one per readable input)
    errors: int  # inputs that could not be read
    seconds: float
    manifest: dict[str, Any] = field(repr=False, default_factory=dict)


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
) -> PredictResult:
    """Batch inference from raw images to Parquet under ``output``: one row per readable
    input (row_id, path, label when known, predicted, class_name, probabilities), an
    errors table for the rest, and a manifest written last.

    Raises:
        FileExistsError: ``output`` holds predictions already (and not ``overwrite``).
    """
    started = time.perf_counter()
    if read_json(storage.join(output, MANIFEST), storage_options) is not None:
        if not overwrite:
            raise FileExistsError(f"{output!r} already holds predictions; pass overwrite=True or choose another output")
        clear(output, storage_options)
    src = source if isinstance(source, ImageSource) else read_images(source, storage_options)
    info = surgery.get_info(model)
    class_names = info.classes or src.classes
    plan = ShardPlan(len(src), shard_rows)
    table = src.table.append_column("shard", pa.array(plan.shard_of(np.arange(len(src))).astype(np.int64)))
    ds, _, _ = _scored(model, ImageSource(src.uri, table, src.classes, src.layout, src.storage_options), storage_options,
                       batch_size, resources, image_size, None)
    writer = ShardWriter(output, storage_options, plan, range(plan.count),
                         ["row_id", "path", "label", "predicted", "class_name", "probabilities"])
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        predicted = np.asarray(batch["predicted"])
        batch["class_name"] = np.asarray([class_names[i] if i < len(class_names) else str(i) for i in predicted], dtype=object)
        writer.add(batch)
    if writer.open_shards:
        raise RuntimeError(f"prediction ended with shards {writer.open_shards[:10]} incomplete")
    errors = gather_errors(output, storage_options, range(plan.count))
    write_table(storage.join(output, ERRORS), errors, storage_options)
    manifest = {
        "format": "freezeray.predictions/1",
        "model": info.name,
        "model_fingerprint": surgery.fingerprint(model),
        "classes": list(class_names),
        "source": {"uri": src.uri, "layout": src.layout, "rows": len(src), "listing_hash": src.listing_hash()},
        "rows": writer.rows_written,
        "errors": int(errors.num_rows),
        "shards": [{"path": shard_path(i)} for i in range(plan.count)],
        "errors_file": ERRORS,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(storage.join(output, MANIFEST), manifest, storage_options)
    seconds = time.perf_counter() - started
    log.info("predicted %d images (%d errors) in %.1fs -> %s", writer.rows_written, errors.num_rows, seconds, output)
    return PredictResult(output, writer.rows_written, int(errors.num_rows), seconds, manifest)
