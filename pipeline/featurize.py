"""``pipeline.featurize``: the frozen part of a model mapped over a whole image set with
Ray Data, written as committed Parquet shards (see :mod:`pipeline.shards`).

The job is two Ray Data stages and a writer:

1. CPU tasks read and decode images and resize/crop them to uint8 pixels
   (:func:`pipeline.sources.read_and_decode`); a bad file becomes an error row;
2. a pool of model actors (:class:`Featurizer`), GPU actors when asked for or when the
   cluster has GPUs, normalizes the pixels and runs the frozen sub-graph under
   ``torch.inference_mode`` (with fp16 autocast on GPU);
3. the driver streams the features and writes each planned shard whole as soon as its
   last row arrives, then commits a manifest.

Decoding never runs on the model actors, so a GPU never waits on JPEG decoding.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import time
from datetime import datetime, timezone
from typing import Any, Callable, Literal, Sequence

import numpy as np
import pyarrow as pa
import torch
import torch.fx as fx

import surgery
from surgery import storage
from surgery.freeze import apply_frozen_, feature_extractor_nodes, frozen_nodes
from surgery.helper import split
from surgery.preprocess import (
    MAX_IMAGE_PIXELS,
    PreprocessConfig,
    model_preprocessing,
    normalize,
)

from .features import FEATURES_FORMAT, FeatureSet
from .lease import OutputLease
from .resources import Resources
from .shards import (
    ATTEMPT,
    ERRORS,
    MANIFEST,
    ShardPlan,
    ShardWriter,
    clear,
    completed_shards,
    gather_errors,
    read_json,
    shard_path,
    write_json,
    write_table,
)
from .sources import ImageSource, decode_dataset, read_images, readable

__all__ = ["featurize", "Featurizer", "feature_model"]

log = logging.getLogger(__name__)

FeatureDtype = Literal["float16", "float32"]


class Featurizer:
    """Ray Data callable class: holds the frozen sub-graph, loaded once per actor, and
    maps a batch of uint8 pixels to features. Testable without Ray: pass the graph itself.

    Args:
        model: the frozen sub-graph (a ``GraphModule``), or ``[ObjectRef]`` of one.
        preprocessing: ``PreprocessConfig.to_dict()`` (for mean/std).
        dtype: feature dtype written out.
        feature_shapes: per-row shape of each output, for batches with no good rows.
        device: ``"auto"`` (CUDA when this actor has a GPU), ``"cuda"`` or ``"cpu"``.
        autocast: fp16 autocast on CUDA.
        threads: torch intra-op threads on CPU (None: leave torch's default).
    """

    def __init__(self, model: Any, preprocessing: dict[str, Any], dtype: FeatureDtype,
                 feature_shapes: Sequence[Sequence[int]], device: str = "auto", autocast: bool = True,
                 threads: int | None = None) -> None:
        if isinstance(model, list):  # [ObjectRef]: wrapped so Ray does not resolve it in the task spec
            import ray

            model = ray.get(model[0])
        if threads:
            torch.set_num_threads(int(threads))
        use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
        self.device = torch.device("cuda" if use_cuda else "cpu")
        self.model: fx.GraphModule = model.to(self.device).eval()
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.autocast = autocast and self.device.type == "cuda"
        self.config = PreprocessConfig.from_dict(preprocessing)
        self.dtype = np.dtype(dtype)
        self.shapes = [tuple(s) for s in feature_shapes]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        errors = np.asarray(batch["error"], dtype=object)
        ok = readable(errors)
        n = len(errors)
        outs: list[np.ndarray] = [np.zeros((n, *s), dtype=self.dtype) for s in self.shapes]
        if ok.any():
            pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok]))
            if self.device.type == "cuda":
                pixels = pixels.pin_memory().to(self.device, non_blocking=True)
            amp = torch.autocast("cuda", dtype=torch.float16) if self.autocast else contextlib.nullcontext()
            with torch.inference_mode(), amp:
                x = normalize(pixels, self.config)  # (B, H, W, C) uint8 -> (B, C, H, W) float
                if self.device.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                y = self.model(x)
            ys = y if isinstance(y, tuple) else (y,)
            for out, value in zip(outs, ys):
                out[ok] = value.float().cpu().numpy().astype(self.dtype, copy=False)
        result = {k: batch[k] for k in ("row_id", "path", "label", "shard") if k in batch}
        result["error"] = errors
        for i, out in enumerate(outs):
            result[_column(i, len(outs))] = out
        return result


def _column(i: int, count: int) -> str:
    return "features" if count == 1 else f"features_{i}"


def feature_model(model: fx.GraphModule, boundary: str | Sequence[str] | None) -> fx.GraphModule:
    """``model`` itself when ``boundary`` is None (its frozen part is cut), else a copy
    frozen up to ``boundary`` (DL4J's featurize at a named vertex)."""
    if boundary is None:
        if not frozen_nodes(model):
            raise ValueError(
                "the model has nothing frozen, so there is no boundary to featurize at; "
                "freeze it (TransferLearning(...).set_feature_extractor(...)) or pass boundary='<vertex>'"
            )
        return model
    names = [boundary] if isinstance(boundary, str) else list(boundary)
    copied = copy.deepcopy(model)
    apply_frozen_(copied, feature_extractor_nodes(copied, names))
    return copied


def _feature_shapes(frozen: fx.GraphModule, config: PreprocessConfig) -> list[tuple[int, ...]]:
    x = torch.zeros(1, *config.input_size)
    with torch.no_grad():
        frozen.eval()
        y = frozen(x)
    return [tuple(v.shape[1:]) for v in (y if isinstance(y, tuple) else (y,))]


def _fingerprint(model_fp: str, boundary: Sequence[str], config: PreprocessConfig, dtype: str, listing: str) -> str:
    h = hashlib.sha256(b"freezeray.featurize/1\n")
    h.update(json.dumps({"model": model_fp, "boundary": list(boundary), "preprocessing": config.to_dict(),
                         "dtype": dtype, "listing": listing}, sort_keys=True).encode())
    return h.hexdigest()[:32]


def featurize(
    model: fx.GraphModule,
    source: str | ImageSource,
    output: str,
    *,
    storage_options: dict[str, Any] | None = None,
    boundary: str | Sequence[str] | None = None,
    preprocessing: PreprocessConfig | dict | None = None,
    image_size: int | None = None,
    dtype: FeatureDtype = "float16",
    batch_size: int = 64,
    resources: Resources | None = None,
    decode_batch_size: int = 32,
    shard_rows: int | None = None,
    shard_bytes: int = 64 << 20,
    autocast: bool = True,
    overwrite: bool = False,
    progress: Callable[[int, int, int], None] | None = None,
    max_image_pixels: int | None = MAX_IMAGE_PIXELS,
    lease_timeout: float = 300.0,
) -> FeatureSet:
    """Featurize an image set at the model's frozen boundary and commit it under ``output``.

    Args:
        model: a freezeray model with a frozen part (or any, with ``boundary``).
        source: an image folder/manifest URI, or an :class:`ImageSource`.
        output: the folder URI for shards, errors and manifest.
        storage_options: fsspec options for ``output`` (and ``source`` when it is a URI).
        boundary: featurize at this vertex (freezing up to it) instead of the frozen set.
        preprocessing: replaces the model's preprocessing (a config or some of its fields).
        image_size: shorthand for another input size (e.g. smaller images for a quick run).
        dtype: ``"float16"`` (half the bytes) or ``"float32"``.
        batch_size: images per model call.
        resources: the model actors (:class:`~pipeline.Resources`: ``num_workers`` actors,
            each loading the frozen sub-graph once; ``use_gpu``; CPUs and torch threads per
            actor); left out: one actor per GPU, or on CPU-only clusters one per node using
            its cores (see ``runtime.plan_actors``).
        decode_batch_size: images per decode task.
        shard_rows: rows per Parquet shard; None: as many as fit in ``shard_bytes``.
        autocast: fp16 autocast on GPU actors.
        overwrite: replace an output made with a different fingerprint.
        progress: called on the driver as ``progress(shard, rows, errors)`` after each shard is written.
        max_image_pixels: images with more pixels become error rows without being decoded
            (decompression bombs); None: Pillow's own limit only.
        lease_timeout: seconds after which the output's lease, if its holder on another
            machine stopped renewing it, is taken over (see :mod:`pipeline.lease`).

    Returns:
        the committed :class:`FeatureSet`. Run again with the same inputs, it returns the
        committed set without model work; after an interrupted run (an exception, a killed
        driver, storage that stayed down), it finishes the missing shards only.

    Raises:
        FileExistsError: ``output`` holds features with another fingerprint (and not ``overwrite``).
        LeaseHeld: another live job is writing to ``output``.
        StorageUnavailable: storage failed for longer than the retry window; nothing is
            committed and the shards written so far are kept for the next run.
    """
    import ray

    from .runtime import actor_memory, ensure_ray, plan_actors

    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
    for name, value in (("batch_size", batch_size), ("decode_batch_size", decode_batch_size)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    src = source if isinstance(source, ImageSource) else read_images(source, storage_options)
    feat_model = feature_model(model, boundary)
    parts = split(feat_model)
    config = model_preprocessing(model, preprocessing, image_size)
    shapes = _feature_shapes(parts.frozen, config)
    model_fp = surgery.frozen_fingerprint(feat_model)
    fp = _fingerprint(model_fp, parts.boundary, config, dtype, src.listing_hash())

    committed = read_json(storage.join(output, MANIFEST), storage_options)
    if committed is not None and committed.get("fingerprint") == fp:
        log.info("features at %s are up to date (fingerprint %s): reusing them, nothing recomputed", output, fp)
        return FeatureSet(output, committed, storage_options, reused=True)
    with OutputLease(output, storage_options, lease_timeout) as lease:
        committed = read_json(storage.join(output, MANIFEST), storage_options)  # again, now that we hold the lease
        if committed is not None and committed.get("fingerprint") == fp:
            return FeatureSet(output, committed, storage_options, reused=True)
        row_bytes = sum(math.prod(s) for s in shapes) * np.dtype(dtype).itemsize
        rows_per_shard = shard_rows or int(min(8192, max(64, shard_bytes // max(1, row_bytes))))
        plan = ShardPlan(len(src), rows_per_shard)
        pending = _pending_shards(output, storage_options, fp, plan, committed, overwrite)

        start = time.perf_counter()
        positions = np.arange(len(src))
        shard_ids = plan.shard_of(positions)
        todo = np.isin(shard_ids, pending)
        table = src.table.append_column("shard", pa.array(shard_ids.astype(np.int64))).filter(pa.array(todo))
        writer = ShardWriter(output, storage_options, plan, pending,
                             ["row_id", "path", "label"] + [_column(i, len(shapes)) for i in range(len(shapes))],
                             on_shard=progress, before_write=lease.check)
        if table.num_rows:
            ensure_ray()
            pool = plan_actors(resources)
            model_ref = ray.put(parts.frozen)
            ds = decode_dataset(table, config, src.storage_options, decode_batch_size,
                                rows_per_block=min(rows_per_shard, 4 * decode_batch_size), max_pixels=max_image_pixels)
            ds = ds.map_batches(
                Featurizer, batch_size=batch_size, batch_format="numpy",
                fn_constructor_kwargs={"model": [model_ref], "preprocessing": config.to_dict(), "dtype": dtype,
                                       "feature_shapes": [list(s) for s in shapes], "autocast": autocast,
                                       "threads": pool.threads},
                compute=ray.data.ActorPoolStrategy(size=pool.actors), num_gpus=pool.gpus, num_cpus=pool.cpus,
                memory=actor_memory(parts.frozen, config, batch_size),
            )
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                writer.add(batch)
            if writer.open_shards:
                raise RuntimeError(f"featurization ended with shards {writer.open_shards[:10]} incomplete")
        seconds = time.perf_counter() - start
        lease.check()
        return _commit(output, storage_options, src, plan, fp, model_fp, feat_model, parts.boundary, shapes, dtype,
                       config, seconds, writer)


def _pending_shards(output: str, storage_options: dict | None, fp: str, plan: ShardPlan, committed: dict | None,
                    overwrite: bool) -> list[int]:
    """Make ``output`` ready for this run (under its lease) and return the shards it still
    needs: all of them, or those an interrupted attempt with the same fingerprint and plan
    left. Another run's features or attempt are cleared only with ``overwrite``."""
    if committed is not None:
        if not overwrite:
            raise FileExistsError(
                f"{output!r} already holds features with fingerprint {committed.get('fingerprint')}, "
                f"but this run's fingerprint is {fp} (another model, preprocessing, dtype or input); "
                "pass overwrite=True to replace them, or choose another output"
            )
        clear(output, storage_options)
    attempt = read_json(storage.join(output, ATTEMPT), storage_options)
    if attempt is not None and (attempt.get("fingerprint") != fp or attempt.get("plan") != plan.to_dict()):
        if not overwrite:
            raise FileExistsError(
                f"{output!r} holds an unfinished featurization with fingerprint {attempt.get('fingerprint')}, "
                f"not this run's {fp}; pass overwrite=True to discard it, or choose another output"
            )
        clear(output, storage_options)
        attempt = None
    if attempt is None:
        write_json(storage.join(output, ATTEMPT), {"fingerprint": fp, "plan": plan.to_dict()}, storage_options)
        return list(range(plan.count))
    done = completed_shards(output, storage_options)
    if done:
        log.info("resuming featurization at %s: %d of %d shards already written", output, len(done), plan.count)
    return [i for i in range(plan.count) if i not in done]


def _commit(output: str, storage_options: dict | None, src: ImageSource, plan: ShardPlan, fp: str, model_fp: str,
            model: fx.GraphModule, boundary: Sequence[str], shapes: list, dtype: str, config: PreprocessConfig,
            seconds: float, writer: ShardWriter) -> FeatureSet:
    import pyarrow.parquet as pq

    fs, root = storage.filesystem(output, storage_options)
    shards = []
    for i in range(plan.count):
        path = shard_path(i)
        full = f"{root.rstrip('/')}/{path}"

        def look(full: str = full) -> tuple[dict, int]:
            with fs.open(full, "rb") as f:
                return fs.info(full), pq.ParquetFile(f).metadata.num_rows

        info, rows = storage.retrying(look, f"read {storage.join(output, path)}")
        shards.append({"path": path, "rows": int(rows), "bytes": int(info.get("size") or 0)})
    errors = gather_errors(output, storage_options, range(plan.count))
    write_table(storage.join(output, ERRORS), errors, storage_options)
    rows = sum(s["rows"] for s in shards)
    if rows + errors.num_rows != len(src):
        raise RuntimeError(f"featurization lost rows: {rows} written + {errors.num_rows} errors != {len(src)} inputs")
    images_per_s = writer.rows_written / seconds if seconds > 0 and writer.rows_written else None
    manifest = {
        "format": FEATURES_FORMAT,
        "fingerprint": fp,
        "model_fingerprint": model_fp,
        "model": surgery.get_info(model).name,
        "boundary": list(boundary),
        "feature_columns": [_column(i, len(shapes)) for i in range(len(shapes))],
        "feature_shapes": [list(s) for s in shapes],
        "dtype": dtype,
        "preprocessing": config.to_dict(),
        "classes": list(src.classes),
        "source": {"uri": src.uri, "layout": src.layout, "rows": len(src), "listing_hash": src.listing_hash()},
        "rows": rows,
        "errors": int(errors.num_rows),
        "errors_file": ERRORS,
        "shards": shards,
        "plan": plan.to_dict(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 3),
        "images_per_s": round(images_per_s, 2) if images_per_s else None,
    }
    try:  # the commit: created, never overwritten, so two jobs cannot both commit
        storage.create_bytes(storage.join(output, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True).encode(),
                             storage_options)
    except FileExistsError:
        raise FileExistsError(f"another job committed features at {output!r} first; this run's shards were not "
                              "committed") from None
    storage.delete(storage.join(output, ATTEMPT), storage_options)
    if writer.rows_written or writer.errors_written:
        log.info("featurized %d images (%d errors) in %.1fs: %.1f images/s -> %s", writer.rows_written,
                 writer.errors_written, seconds, images_per_s or 0.0, output)
    return FeatureSet(output, manifest, storage_options)
