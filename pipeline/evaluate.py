"""``pipeline.evaluate``: a model scored over a feature set (its head on the features) or
over raw images (the whole model), with the same actor-pool design as featurization (or
in this process, for a feature set that fits). Metrics are accumulated on the driver
batch by batch (a confusion matrix and loss sums), so no rows are collected. The
:class:`Scorer` is shared with :mod:`pipeline.predict`.

A model with several outputs (``set_outputs``) is scored at each of them against the
same labels: :attr:`EvalResult.outputs` holds every output's accuracy, loss, macro F1
and confusion matrix; the top-level ``loss`` is the model's objective (the weighted sum
of the outputs' losses) and the other top-level metrics are the first output's.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Sequence

import numpy as np
import pyarrow as pa
import torch
import torch.fx as fx

from freezeray import storage
from freezeray.images import PreprocessConfig
from surgery.helper import split
from surgery.layers import compute_loss, emit_logits, probabilities
from surgery.training.objective import LossSpec, loss_specs

from .decode import normalize
from .features import FeatureSet
from .readers import ReadSpec, decode_memory, readable, rows_dataset, source_rows
from .resources import Resources
from .shards import MANIFEST, SliceWriter
from .sources import ImageSource, read_images

__all__ = ["evaluate", "Scorer", "EvalResult"]

log = logging.getLogger(__name__)


class Scorer:
    """Ray Data callable class: a model (whole, on pixels; or its head, on features),
    loaded once per actor, mapping a batch to predictions, class probabilities and the
    per-row loss. Testable without Ray: pass the graph itself.

    ``loss``: the output's :class:`LossSpec` as a dict, or a list of them for a model
    with several outputs; then ``predicted``/``probabilities`` are the first output's,
    ``loss`` is the weighted sum, and ``predicted_<i>``/``loss_<i>`` hold output ``i``'s."""

    def __init__(self, model: Any, inputs: Literal["pixels", "features"], loss: dict[str, Any] | list[dict[str, Any]],
                 preprocessing: dict[str, Any] | None = None, feature_columns: Sequence[str] = (),
                 device: str = "auto", autocast: bool = True, threads: int | None = None,
                 writer: dict[str, Any] | None = None) -> None:
        if isinstance(model, list):
            import ray

            model = ray.get(model[0])
        if threads:
            torch.set_num_threads(int(threads))
        use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
        self.device = torch.device("cuda" if use_cuda else "cpu")
        self.model = model.to(self.device).eval()
        convolutional = any(isinstance(m, torch.nn.Conv2d) for m in self.model.modules())
        self.memory_format = torch.channels_last if convolutional and inputs == "pixels" else torch.contiguous_format
        self.model = self.model.to(memory_format=self.memory_format)
        self.inputs = inputs
        self.specs = [LossSpec.from_dict(d) for d in (loss if isinstance(loss, list) else [loss])]
        self.spec = self.specs[0]
        self.config = PreprocessConfig.from_dict(preprocessing) if preprocessing else None
        self.columns = tuple(feature_columns)
        self.autocast = autocast and self.device.type == "cuda"
        self.writer = SliceWriter.from_dict(writer) if writer is not None else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["row_id"])
        errors = np.asarray(batch["error"], dtype=object) if "error" in batch else np.full(n, "", dtype=object)
        ok = readable(errors)
        k = len(self.specs)
        probs = np.zeros((n, self.spec.n_out or 1), dtype=np.float32)
        predicted = [np.zeros(n, dtype=np.int32) for _ in range(k)]
        losses = [np.full(n, np.nan, dtype=np.float32) for _ in range(k)]
        if ok.any():
            if self.inputs == "pixels":
                pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok])).to(self.device)
                x = (normalize(pixels, self.config).contiguous(memory_format=self.memory_format),)
            else:
                x = tuple(torch.from_numpy(np.asarray(batch[c][ok])).to(self.device, torch.float32) for c in self.columns)
            amp = torch.autocast("cuda", dtype=torch.float16) if self.autocast else contextlib.nullcontext()
            with torch.inference_mode(), amp, emit_logits(self.model):
                out = self.model(*x)
                outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
                labels = torch.from_numpy(np.asarray(batch["label"])[ok].astype(np.int64)).to(self.device)
                known = labels >= 0
                for i, (spec, o) in enumerate(zip(self.specs, outs)):
                    z = o.float()
                    p = probabilities(spec.loss, z, spec.activation, spec.logits)
                    if i == 0:
                        probs = np.zeros((n, p.shape[1]), dtype=np.float32)
                        probs[ok] = p.cpu().numpy()
                    predicted[i][ok] = p.argmax(1).cpu().numpy().astype(np.int32)
                    if known.any():
                        per_row = torch.full((int(ok.sum()),), float("nan"), device=self.device)
                        per_row[known] = compute_loss(spec.loss, z[known], labels[known], spec.activation,
                                                      logits=spec.logits, reduction="none").float()
                        losses[i][ok] = per_row.cpu().numpy()
        result = {k: batch[k] for k in ("row_id", "path", "label", "shard", "index", "last") if k in batch}
        total = losses[0] if k == 1 else np.sum([s.weight * v for s, v in zip(self.specs, losses)], axis=0, dtype=np.float32)
        result.update(error=errors, probabilities=probs, predicted=probs.argmax(1).astype(np.int32), loss=total)
        if k > 1:
            for i in range(k):
                result[f"predicted_{i}"], result[f"loss_{i}"] = predicted[i], losses[i]
        return self.writer(result) if self.writer is not None else result


# ---------------------------------------------------------------------------------------
# evaluate


@dataclass
class EvalResult:
    """Metrics of a model on a labelled data set."""

    accuracy: float  # share of rows whose top class is the label
    loss: float  # mean loss of the output layer
    rows: int  # rows scored
    errors: int  # inputs that could not be read: error rows of the images, or of the feature set's images
    classes: tuple[str, ...]  # class names by label
    confusion: list[list[int]]  # confusion[true][predicted]
    per_class: list[dict[str, Any]]  # class, precision, recall, f1, support
    macro_f1: float  # unweighted mean F1 over classes with support
    seconds: float = 0.0  # wall time
    source: str = ""  # what was evaluated
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)  # several outputs: each one's accuracy, loss, macro_f1, confusion
    error_examples: list[dict[str, str]] = field(default_factory=list)  # the first few error rows: path, reason
    errors_uri: str | None = None  # the feature set whose errors_table() holds every error row; None: in memory
    _error_rows: list[tuple[str, str]] = field(default_factory=list, repr=False)  # images: (path, reason) of each

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("_error_rows")
        d["classes"] = list(self.classes)
        if not self.outputs:
            del d["outputs"]
        return d

    def errors_table(self, storage_options: dict[str, Any] | None = None) -> pa.Table:
        """(path, reason) of every input that could not be read."""
        if self.errors_uri is not None:
            return FeatureSet.open(self.errors_uri, storage_options).errors_table().select(["path", "reason"])
        return pa.table({"path": pa.array([p for p, _ in self._error_rows], pa.string()),
                         "reason": pa.array([r for _, r in self._error_rows], pa.string())})

    def table(self) -> str:
        """The per-class table as text."""
        width = max([5] + [len(c["class"]) for c in self.per_class])
        lines = [f"{'class'.ljust(width)}  precision  recall  f1      support"]
        for c in self.per_class:
            lines.append(f"{c['class'].ljust(width)}  {c['precision']:.4f}     {c['recall']:.4f}  {c['f1']:.4f}  {c['support']}")
        lines.append(f"accuracy {self.accuracy:.4f}  loss {self.loss:.4f}  macro F1 {self.macro_f1:.4f}  rows {self.rows}  errors {self.errors}")
        for vertex, m in self.outputs.items():
            lines.append(f"output {vertex}: accuracy {m['accuracy']:.4f}  loss {m['loss']:.4f}  macro F1 {m['macro_f1']:.4f}")
        return "\n".join(lines)


def _metrics(confusion: np.ndarray, loss_sum: float, loss_rows: int, errors: int, classes: Sequence[str],
             seconds: float, source: str) -> EvalResult:
    rows = int(confusion.sum())
    tp = np.diag(confusion).astype(float)
    per_class = []
    f1s = []
    for i, name in enumerate(classes):
        predicted, support = confusion[:, i].sum(), confusion[i, :].sum()
        precision = tp[i] / predicted if predicted else 0.0
        recall = tp[i] / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        if support:
            f1s.append(f1)
        per_class.append({"class": str(name), "precision": float(precision), "recall": float(recall),
                          "f1": float(f1), "support": int(support)})
    return EvalResult(
        accuracy=float(tp.sum() / rows) if rows else 0.0,
        loss=float(loss_sum / loss_rows) if loss_rows else float("nan"),
        rows=rows, errors=errors, classes=tuple(str(c) for c in classes),
        confusion=confusion.astype(int).tolist(), per_class=per_class,
        macro_f1=float(np.mean(f1s)) if f1s else 0.0, seconds=seconds, source=source,
    )


def _loss_arg(specs: Sequence[LossSpec]) -> dict[str, Any] | list[dict[str, Any]]:
    """The Scorer's ``loss``: one spec's dict, or a list for several outputs."""
    return specs[0].to_dict() if len(specs) == 1 else [s.to_dict() for s in specs]


def _count_errors(result: EvalResult, data: Any, storage_options: dict | None, rows: list[tuple[str, str]]) -> None:
    """The error rows of what was evaluated, on ``result``: on a feature set, those of
    the images it was made from (its rows are the readable ones); on images, ``rows``."""
    if _is_feature_set(data, storage_options):
        fset = data if isinstance(data, FeatureSet) else FeatureSet.open(str(data), storage_options)
        table = fset.errors_table() if fset.errors else None
        rows = list(zip(table.column("path").to_pylist(), table.column("reason").to_pylist())) if table is not None else []
        result.errors += fset.errors
        result.errors_uri = fset.uri
    else:
        result._error_rows = rows
    result.error_examples = [{"path": p, "reason": r} for p, r in rows[:5]]


def _is_feature_set(data: Any, storage_options: dict | None) -> bool:
    if isinstance(data, FeatureSet):
        return True
    if isinstance(data, ImageSource):
        return False
    return storage.exists(storage.join(str(data), MANIFEST), storage_options)


def _pool(model: fx.GraphModule, resources: Resources | None, on_features: bool) -> Any:
    from .runtime import ensure_ray, plan_actors

    ensure_ray()
    specs = loss_specs(model)
    # a head on features is cheap: one actor, unless asked; images get the featurization plan
    if on_features and (resources is None or resources.num_workers is None):
        resources = (resources or Resources()).model_copy(update={"num_workers": 1})
    return specs, plan_actors(resources)


def _one_output(specs: Sequence[LossSpec]) -> None:
    if len(specs) != 1:
        raise ValueError(f"predict needs a model with one output; it has {len(specs)} ({', '.join(s.vertex for s in specs)}): "
                         "set_outputs(...) the one to predict with")


def _score(ds: Any, model: fx.GraphModule, kwargs: dict[str, Any], pool: Any, batch_size: int, config: Any) -> Any:
    import ray
    import ray.data

    from .runtime import actor_memory, worker_env

    kwargs = {**kwargs, "model": [ray.put(model)], "threads": pool.threads}
    return ds.map_batches(Scorer, batch_size=batch_size, batch_format="numpy", fn_constructor_kwargs=kwargs,
                          compute=ray.data.ActorPoolStrategy(size=pool.actors), num_gpus=pool.gpus, num_cpus=pool.cpus,
                          memory=actor_memory(model, config, batch_size), **worker_env(pool.env))


def _scored(model: fx.GraphModule, data: Any, storage_options: dict | None, batch_size: int, resources: Resources | None,
            image_size: int | None, classes: Sequence[str] | None) -> tuple[Any, tuple[str, ...], str]:
    """A Ray Dataset of scored rows for ``data``, its classes, and what it is."""
    from surgery.recipe import model_preprocessing

    on_features = _is_feature_set(data, storage_options)
    specs, pool = _pool(model, resources, on_features)
    if on_features:
        fset = data if isinstance(data, FeatureSet) else FeatureSet.open(str(data), storage_options)
        fset.check(model)
        kwargs = {"inputs": "features", "loss": _loss_arg(specs), "feature_columns": list(fset.feature_columns)}
        return _score(fset.to_dataset(), split(model).unfrozen, kwargs, pool, batch_size, None), fset.classes, \
            f"feature set {fset.uri}"
    src = data if isinstance(data, ImageSource) else read_images(str(data), storage_options, classes=classes)
    config = model_preprocessing(model, None, image_size)
    kwargs = {"inputs": "pixels", "loss": _loss_arg(specs), "preprocessing": config.to_dict()}
    ds = source_rows(src, config, num_cpus=pool.decode_cpus)
    return _score(ds, model, kwargs, pool, batch_size, config), tuple(src.classes), f"images {src.uri}"


def scored_rows(model: fx.GraphModule, src: ImageSource, shards: list[tuple[int, Any]], stride: int,
                writer: dict[str, Any], batch_size: int, resources: Resources | None, config: Any) -> Any:
    """Predictions of these shards of ``src``, written where they are scored (``writer``):
    a Ray Dataset of slice summaries (for :func:`pipeline.predict`)."""
    specs, pool = _pool(model, resources, False)
    _one_output(specs)
    read = ReadSpec(src.storage_options, config.to_dict(), stride, options=src.options.to_dict(),
                    classes=tuple(src.classes), root=src.root)
    ds = rows_dataset(src, shards, read, pool.decode_cpus, decode_memory(config, read.batch_size), 4 * read.batch_size)
    kwargs = {"inputs": "pixels", "loss": _loss_arg(specs), "preprocessing": config.to_dict(), "writer": writer}
    return _score(ds, model, kwargs, pool, batch_size, config)


def _local_scored(model: fx.GraphModule, data: Any, storage_options: dict | None, batch_size: int,
                  resources: Resources | None) -> tuple[Any, tuple[str, ...], str]:
    """Scored batches of a feature set small enough for this process (as ``fit_head``'s
    local mode decides), computed here without Ray; ``(None, (), "")`` otherwise."""
    import math

    from .head import local_limit_bytes

    if not _is_feature_set(data, storage_options) or (resources is not None and resources.num_workers):
        return None, (), ""
    fset = data if isinstance(data, FeatureSet) else FeatureSet.open(str(data), storage_options)
    if fset.rows * 4 * sum(math.prod(s) for s in fset.feature_shapes) > local_limit_bytes() or fset.rows == 0:
        return None, (), ""
    fset.check(model)
    table = fset.read(["row_id", "label", *fset.feature_columns])
    scorer = Scorer(copy.deepcopy(split(model).unfrozen), "features", _loss_arg(loss_specs(model)),
                    feature_columns=fset.feature_columns, device="cpu")
    columns = {c: (table.column(c).combine_chunks().to_numpy_ndarray() if c in fset.feature_columns
                   else table.column(c).to_numpy()) for c in table.column_names}

    def batches() -> Any:
        for i in range(0, fset.rows, batch_size):
            yield scorer({c: v[i:i + batch_size] for c, v in columns.items()})

    return batches(), fset.classes, f"feature set {fset.uri}"


def evaluate(
    model: fx.GraphModule,
    data: str | FeatureSet | ImageSource,
    *,
    storage_options: dict[str, Any] | None = None,
    batch_size: int = 256,
    resources: Resources | None = None,
    image_size: int | None = None,
    classes: Sequence[str] | None = None,
) -> EvalResult:
    """Accuracy, loss, per-class precision/recall/F1 and the confusion matrix of ``model``
    on labelled ``data``: a committed feature set (URI or :class:`FeatureSet`; the head
    runs on its features) or an image folder/manifest (the whole model runs on images). A
    feature set small enough for this process (``fit_head``'s local-mode rule) is scored
    here without Ray, unless ``resources.num_workers`` asks for actors.

    Raises:
        FeatureMismatch: a feature set made by another frozen graph.
        ValueError: unlabeled data, or labels the output cannot score.
    """
    started = time.perf_counter()
    batches, names, what = _local_scored(model, data, storage_options, batch_size, resources)
    if batches is None:
        ds, names, what = _scored(model, data, storage_options, batch_size, resources, image_size, classes)
        batches = ds.iter_batches(batch_size=None, batch_format="numpy")
    specs = loss_specs(model)
    for spec in specs:
        if spec.n_out is not None and len(names) > spec.n_out:
            raise ValueError(f"the data has {len(names)} classes but output {spec.vertex!r} has {spec.n_out} units")
    k = max([len(names)] + [s.n_out or 0 for s in specs])
    several = len(specs) > 1
    confusions = [np.zeros((k, k), dtype=np.int64) for _ in specs]
    output_loss = [[0.0, 0] for _ in specs]
    loss_sum, loss_rows, errors, unlabeled = 0.0, 0, 0, 0
    error_rows: list[tuple[str, str]] = []
    for batch in batches:
        if "index" in batch:  # a shard's end marker is not a row
            batch = {k: np.asarray(v)[np.asarray(batch["index"]) >= 0] for k, v in batch.items()}
        bad = ~readable(batch["error"])
        errors += int(bad.sum())
        if bad.any() and "path" in batch:
            error_rows += zip(map(str, np.asarray(batch["path"])[bad]), map(str, np.asarray(batch["error"])[bad]))
        labels = np.asarray(batch["label"])[~bad]
        unlabeled += int((labels < 0).sum())
        keep = labels >= 0
        for i, confusion in enumerate(confusions):
            predicted = np.asarray(batch[f"predicted_{i}" if several else "predicted"])[~bad]
            np.add.at(confusion, (labels[keep], np.minimum(predicted[keep], k - 1)), 1)
            if several:
                part = np.asarray(batch[f"loss_{i}"])[~bad][keep]
                output_loss[i][0] += float(np.nansum(part))
                output_loss[i][1] += int(np.isfinite(part).sum())
        losses = np.asarray(batch["loss"])[~bad][keep]
        loss_sum += float(np.nansum(losses))
        loss_rows += int(np.isfinite(losses).sum())
    if unlabeled:
        raise ValueError(f"{unlabeled} rows of {what} have no label; evaluate needs labelled data (use predict)")
    class_names = list(names) + [str(i) for i in range(len(names), k)]
    seconds = time.perf_counter() - started
    result = _metrics(confusions[0], loss_sum, loss_rows, errors, class_names, seconds, what)
    if several:
        for spec, confusion, (o_sum, o_rows) in zip(specs, confusions, output_loss):
            m = _metrics(confusion, o_sum, o_rows, errors, class_names, seconds, what)
            result.outputs[spec.vertex] = {"accuracy": m.accuracy, "loss": m.loss, "macro_f1": m.macro_f1,
                                           "weight": spec.weight, "confusion": m.confusion}
    _count_errors(result, data, storage_options, error_rows)
    log.info("evaluated %s: accuracy %.4f, loss %.4f over %d rows (%d errors)", what, result.accuracy, result.loss,
             result.rows, result.errors)
    return result
