"""``pipeline.featurize``: the frozen part of a model mapped over a whole image set with
Ray Data, written as committed Parquet shards where it is computed.

The job is two Ray Data stages and a commit:

1. CPU tasks read the input shards (tars, Parquet files, manifest fragments: one task
   each) or the loose files (:mod:`pipeline.readers`) and, with ``decode="cpu"``, decode
   and resize/crop the images to uint8 pixels; with ``decode="gpu"`` they only read the
   bytes, which the model actors decode on their device (:mod:`pipeline.decode`). A bad
   image becomes an error row either way;
2. a pool of model actors (:class:`Featurizer`; GPU actors when asked for or when the
   cluster has GPUs) runs the frozen sub-graph under ``torch.inference_mode`` (fp16
   autocast on GPU, ``channels_last`` for convolutional graphs on CPU and GPU) and writes
   each batch's rows where it runs (:class:`pipeline.shards.SliceWriter`), returning one
   summary per slice;
3. the driver plans one output shard per input shard, holds the output's lease, seals
   each shard as it completes and commits a new version (:mod:`pipeline.output`). No
   feature byte passes through it, and it holds nothing per row of a sharded input.

Run again, it computes only what changed: new or changed input shards (loose files: new
and changed files) are computed, unchanged ones kept, removed ones dropped.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import math
import warnings
from datetime import datetime, timezone
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import pyarrow as pa
import torch
import torch.fx as fx

import surgery
from freezeray.images import MAX_IMAGE_PIXELS, PreprocessConfig
from surgery.fingerprint import probe as frozen_probe
from surgery.freeze import apply_frozen_, feature_extractor_nodes, frozen_nodes
from surgery.graph import example_input
from surgery.helper import split
from surgery.recipe import model_preprocessing

from .decode import normalize
from .features import FeatureSet
from .manifest import FEATURES_FORMAT, FeaturesManifest, SourceInfo, probe_sample
from .output import OutputJob, Progress, Written, classes_of, write_output
from .readers import ReadSpec, decode_memory, readable, rows_dataset
from .resources import Resources
from .shards import SliceWriter, to_arrow_columns
from .sources import Format, ImageSource, read_images

__all__ = ["featurize", "Featurizer", "feature_model", "Decode", "default_batch_size", "Progress"]

log = logging.getLogger(__name__)

FeatureDtype = Literal["float16", "float32"]
Decode = Literal["auto", "cpu", "gpu"]
SLICE_ROWS = 512  # rows per GPU model-actor call (a quarter on CPU, to start sooner), so the most rows in a slice


def default_batch_size(gpu: bool) -> int:
    """Images per forward pass when none is given: 16 on CPU (measured on 2 cores with
    efficientnet_lite0: 8-16 images ran 1.5-2x faster than 64, whose activations overflow
    the caches), 128 on a GPU."""
    return 128 if gpu else 16


def _is_convolutional(model: torch.nn.Module) -> bool:
    """Whether ``model`` has 2-D convolutions (also as TorchScript, which keeps their class names)."""
    return any(isinstance(m, torch.nn.Conv2d) or "Conv2d" in getattr(m, "original_name", "") for m in model.modules())


class Featurizer:
    """Ray Data callable class: holds the frozen sub-graph, loaded once per actor, and
    maps a batch of uint8 pixels (or, with ``decode="gpu"``, file bytes) to features.
    Testable without Ray: pass the graph itself and no ``writer``.

    Args:
        model: the frozen sub-graph (a ``GraphModule``), or ``[ObjectRef]`` of one.
        preprocessing: ``PreprocessConfig.to_dict()`` (for mean/std, and sizes to decode).
        dtype: feature dtype written out.
        feature_shapes: per-row shape of each output, for batches with no good rows.
        device: ``"auto"`` (CUDA when this actor has a GPU), ``"cuda"`` or ``"cpu"``.
        autocast: fp16 autocast on CUDA.
        threads: torch intra-op threads on CPU (None: leave torch's default).
        batch_size: images per forward pass (a call may hold several).
        decode: ``"cpu"``: the batch holds decoded ``pixels``; ``"gpu"``: it holds ``data``
            (the files' bytes), decoded here on ``device``.
        max_pixels: with ``decode="gpu"``: images with more pixels become error rows.
        writer: ``SliceWriter.to_dict()``: write the rows where they are computed and
            return one summary per slice; None: return the features.
    """

    def __init__(self, model: Any, preprocessing: dict[str, Any], dtype: FeatureDtype,
                 feature_shapes: Sequence[Sequence[int]], device: str = "auto", autocast: bool = True,
                 threads: int | None = None, batch_size: int = 16, decode: Literal["cpu", "gpu"] = "cpu",
                 max_pixels: int | None = MAX_IMAGE_PIXELS, writer: dict[str, Any] | None = None) -> None:
        if isinstance(model, list):  # [ObjectRef]: wrapped so Ray does not resolve it in the task spec
            import ray

            model = ray.get(model[0])
        if isinstance(model, (bytes, bytearray)):  # TorchScript (see script_frozen)
            with _quiet_jit():
                model = torch.jit.load(io.BytesIO(model), map_location="cpu")
        if threads:
            torch.set_num_threads(int(threads))
        use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
        self.device = torch.device("cuda" if use_cuda else "cpu")
        self.model: fx.GraphModule = model.to(self.device).eval()
        # channels_last: oneDNN's and cuDNN's fast layout for convolutions (1.8x on 2 CPU
        # cores for efficientnet_lite0, see benchmarks/README.md)
        self.memory_format = torch.channels_last if _is_convolutional(self.model) else torch.contiguous_format
        self.model = self.model.to(memory_format=self.memory_format)
        self.autocast = autocast and self.device.type == "cuda"
        self.config = PreprocessConfig.from_dict(preprocessing)
        self.dtype = np.dtype(dtype)
        self.shapes = [tuple(s) for s in feature_shapes]
        self.batch_size = int(batch_size)
        self.decode = decode
        self.max_pixels = max_pixels
        self.writer = SliceWriter.from_dict(writer) if writer is not None else None

    def _pixels(self, batch: dict[str, np.ndarray]) -> tuple[torch.Tensor | None, np.ndarray]:
        """The batch's good rows as (B, H, W, C) uint8 on the device, and every row's error."""
        if self.decode == "gpu":
            from .decode import decode_batch

            data = list(batch["data"])
            pixels, errors = decode_batch(data, [str(e) for e in batch["error"]], self.config, self.device,
                                          self.max_pixels)
            errors_arr = np.asarray(errors, dtype=object)
            ok = readable(errors_arr)
            return (pixels[torch.from_numpy(ok).to(self.device)] if ok.any() else None), errors_arr
        errors_arr = np.asarray(batch["error"], dtype=object)
        ok = readable(errors_arr)
        if not ok.any():
            return None, errors_arr
        pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok]))
        if self.device.type == "cuda":
            pixels = pixels.pin_memory().to(self.device, non_blocking=True)
        return pixels, errors_arr

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels, errors = self._pixels(batch)
        ok = readable(errors)
        n = len(errors)
        outs: list[np.ndarray] = [np.zeros((n, *s), dtype=self.dtype) for s in self.shapes]
        if pixels is not None:
            amp = torch.autocast("cuda", dtype=torch.float16) if self.autocast else contextlib.nullcontext()
            chunks: list[list[np.ndarray]] = [[] for _ in self.shapes]
            with torch.inference_mode(), amp:
                for i in range(0, len(pixels), self.batch_size):
                    x = normalize(pixels[i:i + self.batch_size], self.config)  # (B, H, W, C) uint8 -> (B, C, H, W) float
                    y = self.model(x.contiguous(memory_format=self.memory_format))
                    for chunk, value in zip(chunks, y if isinstance(y, tuple) else (y,)):
                        chunk.append(value.float().cpu().numpy().astype(self.dtype, copy=False))
            for out, chunk in zip(outs, chunks):
                out[ok] = np.concatenate(chunk)
        result = {k: batch[k] for k in ("row_id", "path", "label", "shard", "index", "last") if k in batch}
        result["error"] = errors
        for i, out in enumerate(outs):
            result[_column(i, len(outs))] = out
        return self.writer(result) if self.writer is not None else result


@contextlib.contextmanager
def _quiet_jit() -> Iterator[None]:
    """torch 2.x deprecates ``torch.jit.save``/``load`` in favour of ``torch.export`` with a
    FutureWarning on every call (in the driver and in every actor); TorchScript is still
    what ships a graph without timm here (see :func:`script_frozen`), so the users of
    freezeray are not shown a warning meant for its developers."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.(save|load)` is deprecated", category=FutureWarning)
        yield


def script_frozen(frozen: fx.GraphModule, config: PreprocessConfig) -> bytes | None:
    """The frozen sub-graph as TorchScript (traced on the model's input size), which a model
    actor loads without importing the libraries its modules come from: timm alone is 1.7 s
    of every actor's start-up on 2 cores. None when tracing fails, or when the traced graph
    computes anything else than the original on another batch size (a graph that turned a
    shape into a constant): the actors then get the graph itself."""
    g = torch.Generator().manual_seed(0)
    module = copy.deepcopy(frozen).eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(module, torch.randn(1, *config.input_size, generator=g), check_trace=False)
            x = torch.randn(2, *config.input_size, generator=g)
            want, got = module(x), traced(x)
        want, got = (want if isinstance(want, tuple) else (want,)), (got if isinstance(got, tuple) else (got,))
        if len(want) != len(got) or not all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(want, got)):
            return None
        buf = io.BytesIO()
        with _quiet_jit():
            torch.jit.save(traced, buf)
        return buf.getvalue()
    except Exception as exc:  # tracing is an optimisation: the graph itself always works
        log.debug("the frozen graph does not trace to TorchScript (%s); actors get the graph", exc)
        return None


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


def _fingerprint(model_fp: str, boundary: Sequence[str], config: PreprocessConfig, dtype: str) -> str:
    """What features are computed from an image: the frozen part, where it is cut, the
    preprocessing and the dtype (not which images: a set that grows is extended)."""
    h = hashlib.sha256(b"freezeray.featurize/2\n")
    h.update(json.dumps({"model": model_fp, "boundary": list(boundary), "preprocessing": config.to_dict(),
                         "dtype": dtype}, sort_keys=True).encode())
    return h.hexdigest()[:32]


def _schema(shapes: Sequence[Sequence[int]], dtype: str) -> pa.Schema:
    """The Arrow schema of a feature shard: row_id, path, label and one tensor column per boundary vertex."""
    empty: dict[str, np.ndarray] = {"row_id": np.zeros(0, np.int64), "path": np.zeros(0, object),
                                    "label": np.zeros(0, np.int32)}
    for i, shape in enumerate(shapes):
        empty[_column(i, len(shapes))] = np.zeros((0, *shape), dtype=dtype)
    return pa.table(to_arrow_columns(empty)).schema


def featurize(
    model: fx.GraphModule,
    source: str | Sequence[str] | ImageSource,
    output: str,
    *,
    storage_options: dict[str, Any] | None = None,
    boundary: str | Sequence[str] | None = None,
    preprocessing: PreprocessConfig | dict | None = None,
    image_size: int | None = None,
    dtype: FeatureDtype = "float16",
    batch_size: int | None = None,
    decode: Decode = "auto",
    resources: Resources | None = None,
    decode_batch_size: int = 32,
    shard_rows: int | None = None,
    shard_bytes: int = 64 << 20,
    autocast: bool = True,
    overwrite: bool = False,
    progress: Progress | None = None,
    max_image_pixels: int | None = MAX_IMAGE_PIXELS,
    lease_timeout: float = 300.0,
    format: Format = "auto",
) -> FeatureSet:
    """Featurize an image set at the model's frozen boundary and commit it under ``output``.

    Args:
        model: a freezeray model with a frozen part (or any, with ``boundary``).
        source: an image source (see :func:`pipeline.read_images`: an ImageFolder, a
            manifest or a folder of them, WebDataset tar shards, Parquet files with image
            bytes; a folder, glob, brace range or list), or an :class:`ImageSource`.
        output: the folder URI for shards, errors and manifest.
        storage_options: fsspec options for ``output`` (and ``source`` when it is a URI).
        boundary: featurize at this vertex (freezing up to it) instead of the frozen set.
        preprocessing: replaces the model's preprocessing (a config or some of its fields).
        image_size: shorthand for another input size (e.g. smaller images for a quick run).
        dtype: ``"float16"`` (half the bytes) or ``"float32"``.
        batch_size: images per forward pass; None: :func:`default_batch_size`.
        decode: ``"cpu"``: CPU tasks decode the images; ``"gpu"``: the model actors decode
            them on their device (see :mod:`pipeline.decode`; on a CPU actor the same path
            runs on its CPU); ``"auto"``: ``"gpu"`` with GPU actors, else ``"cpu"``.
        resources: the model actors (:class:`~pipeline.Resources`: ``num_workers`` actors,
            each loading the frozen sub-graph once; ``use_gpu``; CPUs and torch threads per
            actor); left out: one actor per GPU, or on CPU-only clusters one per node using
            its cores (see ``runtime.plan_actors``).
        decode_batch_size: images per read/decode batch.
        shard_rows: loose files (a folder or one manifest) per shard; None: as many as fit
            in ``shard_bytes`` of features. Sharded inputs keep one output shard per input shard.
        autocast: fp16 autocast on GPU actors.
        overwrite: replace an output made with a different fingerprint.
        progress: called on the driver as ``progress(shard, rows, errors)`` as each shard
            this run computes is sealed (written by the actors, merged into its file).
        max_image_pixels: images with more pixels become error rows without being decoded
            (decompression bombs); None: Pillow's own limit only.
        lease_timeout: seconds after which the output's lease, if its holder on another
            machine stopped renewing it, is taken over (see :mod:`pipeline.lease`).
        format: how to read a URI ``source`` (``"auto"``: recognised from its files).

    Returns:
        the committed :class:`FeatureSet`. Run again with the same model and images, it
        returns the committed set without model work; with images added, changed or
        removed, it computes only those and commits a new version (``FeatureSet.version``);
        after an interrupted run (an exception, a killed driver, storage that stayed down),
        it finishes the unfinished shards only.

    Raises:
        FileExistsError: ``output`` holds features with another fingerprint (and not ``overwrite``).
        LeaseHeld: another live job is writing to ``output``.
        StorageUnavailable: storage failed for longer than the retry window; nothing is
            committed and the shards sealed so far are kept for the next run.
    """
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
    if decode not in ("auto", "cpu", "gpu"):
        raise ValueError(f"decode must be 'auto', 'cpu' or 'gpu', got {decode!r}")
    for name, value in (("batch_size", batch_size), ("decode_batch_size", decode_batch_size), ("shard_rows", shard_rows)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    src = source if isinstance(source, ImageSource) else read_images(source, storage_options, format=format)
    feat_model = feature_model(model, boundary)
    parts = split(feat_model)
    config = model_preprocessing(model, preprocessing, image_size)
    shapes = _feature_shapes(parts.frozen, config)
    model_fp = surgery.frozen_fingerprint(feat_model)
    row_bytes = sum(math.prod(s) for s in shapes) * np.dtype(dtype).itemsize
    probe = probe_sample(frozen_probe(parts.frozen, example_input(config.input_size, batch=1), part="model"))
    job = OutputJob(output, storage_options, _fingerprint(model_fp, parts.boundary, config, dtype), "features",
                    overwrite, lease_timeout, shard_rows or int(min(8192, max(64, shard_bytes // max(1, row_bytes)))), probe)
    settings = {"config": config, "dtype": dtype, "shapes": shapes, "batch_size": batch_size, "decode": decode,
                "resources": resources, "decode_batch_size": decode_batch_size, "autocast": autocast,
                "max_pixels": max_image_pixels}

    def compute(shards: list[tuple[int, Any]], writer: dict[str, Any], stride: int) -> Any:
        return _actors(parts.frozen, src, shards, writer, stride, settings)

    def finish(w: Written) -> FeaturesManifest:
        return _manifest(w, job, src, model_fp, feat_model, parts.boundary, shapes, dtype, config)

    manifest, reused = write_output(job, src, compute, _schema(shapes, dtype), finish, progress)
    return FeatureSet(output, manifest, storage_options, reused=reused)


def _actors(frozen: fx.GraphModule, src: ImageSource, shards: list[tuple[int, Any]], writer: dict[str, Any],
            stride: int, s: dict[str, Any]) -> Any:
    """The two Ray Data stages over ``shards``: read (and decode) tasks, then the model
    actors writing slices; a dataset of slice summaries."""
    import ray

    from .runtime import actor_memory, plan_actors, worker_env

    config = s["config"]
    pool = plan_actors(s["resources"])
    gpu_decode = s["decode"] == "gpu" or (s["decode"] == "auto" and pool.gpus > 0)
    batch = s["batch_size"] or default_batch_size(pool.gpus > 0)
    call_rows = min(stride, max(batch, SLICE_ROWS if pool.gpus > 0 else SLICE_ROWS // 4))
    spec = ReadSpec(src.storage_options, None if gpu_decode else config.to_dict(), stride, s["decode_batch_size"],
                    s["max_pixels"], src.options.to_dict(), tuple(src.classes), src.root)
    ds = rows_dataset(src, shards, spec, pool.decode_cpus, decode_memory(None if gpu_decode else config, s["decode_batch_size"]),
                      min(stride, 4 * s["decode_batch_size"]))
    return ds.map_batches(
        Featurizer, batch_size=call_rows, batch_format="numpy",
        fn_constructor_kwargs={"model": [ray.put(script_frozen(frozen, config) or frozen)],
                               "preprocessing": config.to_dict(), "dtype": s["dtype"],
                               "feature_shapes": [list(x) for x in s["shapes"]], "autocast": s["autocast"],
                               "threads": pool.threads, "batch_size": batch,
                               "decode": "gpu" if gpu_decode else "cpu", "max_pixels": s["max_pixels"],
                               "writer": writer},
        compute=ray.data.ActorPoolStrategy(size=pool.actors), num_gpus=pool.gpus, num_cpus=pool.cpus,
        memory=actor_memory(frozen, config, batch),
        **worker_env(pool.env),
    )


def _manifest(w: Written, job: OutputJob, src: ImageSource, model_fp: str, model: fx.GraphModule,
              boundary: Sequence[str], shapes: list, dtype: str, config: PreprocessConfig) -> FeaturesManifest:
    rows = sum(s.rows for s in w.entries)
    errors = sum(s.errors for s in w.entries)
    images_per_s = w.rows / w.seconds if w.seconds > 0 and w.rows else None
    manifest = FeaturesManifest(
        format=FEATURES_FORMAT, fingerprint=job.fingerprint, version=w.version, model_fingerprint=model_fp,
        model=surgery.get_info(model).name, boundary=list(boundary),
        feature_columns=[_column(i, len(shapes)) for i in range(len(shapes))],
        feature_shapes=[list(s) for s in shapes], dtype=dtype, preprocessing=config.to_dict(),
        classes=list(classes_of(src, w.entries)),
        source=SourceInfo(uri=src.uri, layout=src.format, rows=rows + errors, shards=len(w.entries)),
        rows=rows, errors=errors, shards=w.entries, stride=w.plan.stride,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), seconds=round(w.seconds, 3),
        images_per_s=round(images_per_s, 2) if images_per_s else None, computed=w.computed, dropped=len(w.plan.dropped),
        probe=job.probe,
    )
    if w.computed:
        log.info("featurized %d images in %d shards in %.1fs: %.1f images/s -> %s", w.rows, w.computed, w.seconds,
                 images_per_s or 0.0, job.output)
    return manifest
