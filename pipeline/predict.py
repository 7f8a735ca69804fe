"""``pipeline.predict``: batch inference from raw images to committed Parquet shards
(one row per readable input: row_id, path, label when known, predicted, class_name,
probabilities), an errors table, and a manifest written last.

It follows featurization's commit protocol (:mod:`pipeline.shards`, :mod:`pipeline.output`):
the scoring actors write their rows where they run, one job at a time holds the output's
lease (and reads the committed version again once it holds it), each version is created
exclusively, an interrupted run resumes its unfinished shards, a committed output with the
same fingerprint (the whole model's and the preprocessing) is reused or extended with the
images it lacks, and one with another fingerprint is refused unless ``overwrite``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import torch.fx as fx

import surgery
from surgery.recipe import model_preprocessing
from surgery.training.objective import loss_specs

from .manifest import PREDICTIONS_FORMAT, PredictionsManifest, SourceInfo
from .output import OutputJob, Written, write_output
from .resources import Resources
from .shards import to_arrow_columns
from .sources import Format, ImageSource, read_images

__all__ = ["predict", "PredictResult"]

log = logging.getLogger(__name__)


@dataclass
class PredictResult:
    output: str  # folder with shards/, errors/ and manifest.json
    rows: int  # predictions written (one per readable input)
    errors: int  # inputs that could not be read
    seconds: float
    manifest: PredictionsManifest | None = field(repr=False, default=None)
    reused: bool = False  # the output already held these predictions

    def errors_table(self, storage_options: dict[str, Any] | None = None) -> pa.Table:
        """(row_id, path, reason) of every input that could not be read."""
        from .commit import errors_of

        return errors_of(self.output, self.manifest, storage_options)


def _fingerprint(model_fp: str, preprocessing: dict) -> str:
    h = hashlib.sha256(b"freezeray.predict/2\n")
    h.update(json.dumps({"model": model_fp, "preprocessing": preprocessing}, sort_keys=True).encode())
    return h.hexdigest()[:32]


def _schema(classes: int) -> pa.Schema:
    empty = {"row_id": np.zeros(0, np.int64), "path": np.zeros(0, object), "label": np.zeros(0, np.int32),
             "predicted": np.zeros(0, np.int32), "class_name": np.zeros(0, object),
             "probabilities": np.zeros((0, classes), np.float32)}
    return pa.table(to_arrow_columns(empty)).schema


def _output_width(model: fx.GraphModule, config: Any) -> int:
    """Units of the model's (first) output: the width of the probabilities column."""
    import torch

    specs = loss_specs(model)
    if len(specs) != 1:
        raise ValueError(f"predict needs a model with one output; it has {len(specs)} ({', '.join(s.vertex for s in specs)}): "
                         "set_outputs(...) the one to predict with")
    if specs[0].n_out:
        return int(specs[0].n_out)
    with torch.no_grad():
        out = model.eval()(torch.zeros(1, *config.input_size))
    return int((out[0] if isinstance(out, tuple) else out).shape[-1])


def predict(
    model: fx.GraphModule,
    source: str | Sequence[str] | ImageSource,
    output: str,
    *,
    storage_options: dict[str, Any] | None = None,
    batch_size: int = 64,
    resources: Resources | None = None,
    image_size: int | None = None,
    shard_rows: int = 4096,
    overwrite: bool = False,
    lease_timeout: float = 300.0,
    format: Format = "auto",
) -> PredictResult:
    """Batch inference from raw images to Parquet under ``output``, one shard per input
    shard (``shard_rows`` loose files per shard), by the protocol of ``featurize``.

    Returns:
        a :class:`PredictResult`; an output that already holds these predictions (the same
        model, preprocessing and images) is returned as it is (``reused``); one that holds
        them for some of the images gets the others (a new version).

    Raises:
        FileExistsError: ``output`` holds other predictions (and not ``overwrite``).
        LeaseHeld: another live job is writing to ``output``.
    """
    from .evaluate import scored_rows

    started = time.perf_counter()
    src = source if isinstance(source, ImageSource) else read_images(source, storage_options, format=format)
    info = surgery.get_info(model)
    class_names = tuple(info.classes or src.classes)
    config = model_preprocessing(model, None, image_size)
    model_fp = surgery.fingerprint(model)
    job = OutputJob(output, storage_options, _fingerprint(model_fp, config.to_dict()), "predictions", overwrite,
                    lease_timeout, shard_rows)
    width = _output_width(model, config)

    def compute(shards: list[tuple[int, Any]], writer: dict[str, Any], stride: int) -> Any:
        return scored_rows(model, src, shards, stride, {**writer, "class_names": list(class_names)}, batch_size,
                           resources, config)

    def finish(w: Written) -> PredictionsManifest:
        rows, errors = sum(s.rows for s in w.entries), sum(s.errors for s in w.entries)
        return PredictionsManifest(
            format=PREDICTIONS_FORMAT, fingerprint=job.fingerprint, version=w.version, model=info.name,
            model_fingerprint=model_fp, classes=list(class_names),
            source=SourceInfo(uri=src.uri, layout=src.format, rows=rows + errors, shards=len(w.entries)),
            rows=rows, errors=errors, shards=w.entries, stride=w.plan.stride,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"), seconds=round(w.seconds, 3),
            images_per_s=round(w.rows / w.seconds, 2) if w.seconds > 0 and w.rows else None, computed=w.computed,
            dropped=len(w.plan.dropped))

    manifest, reused = write_output(job, src, compute, _schema(width), finish)
    seconds = time.perf_counter() - started
    if not reused:
        log.info("predicted %d images (%d errors) in %.1fs -> %s", manifest.rows, manifest.errors, seconds, output)
    return PredictResult(output, manifest.rows, manifest.errors, seconds, manifest, reused)
