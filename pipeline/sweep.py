"""``pipeline.sweep``: many heads tried on one feature set with Ray Tune.

The backbone never runs again: the features are read once on the driver, put in the
object store, and every trial trains a head on them with the Ray-free loop
(:func:`surgery.training.run_epochs`), one trial per CPU (or GPU) of the cluster, with
Ray Tune's trial actors reused between trials. An ASHA scheduler stops trials whose
metric trails the others at its rungs (after 4, 8, 16, ... epochs). Each trial keeps a
checkpoint of its best epoch (by the sweep's metric), and the best trial's weights come
back as a full model.

The search space maps settings to Ray Tune search spaces (``tune.loguniform``,
``tune.choice``, ``tune.grid_search``, ...) or to constants:

* any field of :class:`~surgery.FineTuneConfiguration` (``lr``, ``weight_decay``, ``l2``,
  ``dropout``, ``updater``, ``momentum``, ...), applied on top of the model's own;
* training settings: ``epochs``, ``batch_size``, ``patience``, ``max_epochs``;
* ``n_out.<vertex>``: the width of a trainable layer of the head (a ``Dense`` layer, say),
  through ``n_out_replace``; it takes categorical spaces (``tune.choice``,
  ``tune.grid_search``) or constants, since each width is built on the driver.

Every trial holds out the same seeded validation rows (a tenth unless ``validation`` is
given), so trials are compared on the same data.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import numpy as np
import torch
import torch.fx as fx

import surgery
from freezeray import storage as _storage
from surgery import FineTuneConfiguration, TransferLearning
from surgery.freeze import is_frozen
from surgery.graph import VertexError, resolve
from surgery.helper import split
from surgery.training import run_epochs, tensor_batches
from surgery.training.objective import LossSpec, check_targets, loss_specs

from .features import FeatureSet, split_rows
from .head import AUTO_VALIDATION, default_batch_size, feature_tensors, open_features
from .options import Batches, Run, Stopping, Tuning
from .resources import Resources
from .runs import (
    claim_run,
    data_definition,
    describe,
    features_definition,
    fine_tune_definition,
    model_definition,
    restart_run,
)
from .train import default_storage, run_name, seed_of

__all__ = ["sweep", "SweepResult", "SWEEP_METRICS", "TRAINING_KEYS"]

log = logging.getLogger(__name__)

SWEEP_METRICS = ("val_loss", "val_accuracy", "loss", "accuracy")  # what every trial reports each epoch
TRAINING_KEYS = ("epochs", "batch_size", "patience", "max_epochs")
_FTC_KEYS = tuple(k for k in FineTuneConfiguration.model_fields if k != "seed")
_WIDTH = "n_out."


@dataclass
class SweepResult:
    """The outcome of :func:`sweep`."""

    table: Any  # pandas DataFrame: a row per trial (its settings and its best epoch's metrics), best first
    best_config: dict[str, Any]  # the best trial's sampled settings
    best_model: fx.GraphModule  # the full model with the best trial's settings and weights
    best_metrics: dict[str, Any]  # the best trial's best epoch
    metric: str
    mode: str
    seconds: float
    curves: dict[str, list[dict[str, Any]]] = field(default_factory=dict, repr=False)  # trial -> per-epoch metrics
    reused: bool = False  # a sweep of the same name and definition had finished: its result, no trial run
    refit: Any = None  # the FitResult of the best configuration trained on every row, when trials ran on a sample


# ---------------------------------------------------------------------------------------
# checking the space before any trial


def _values(space: Any) -> list[Any] | None:
    """The finite values a search space can take, or None for a continuous one."""
    from ray.tune.search.sample import Categorical, Domain

    if isinstance(space, dict) and set(space) == {"grid_search"}:
        return list(space["grid_search"])
    if isinstance(space, Categorical):
        return list(space.categories)
    if isinstance(space, Domain):
        return None
    return [space]


def _bounds(space: Any) -> list[Any]:
    lower, upper = getattr(space, "lower", None), getattr(space, "upper", None)
    return [v for v in (lower, upper) if v is not None]


def _check_space(space: Mapping[str, Any], model: fx.GraphModule, metric: str, mode: str,
                 has_validation: bool) -> dict[str, list[Any]]:
    """Every problem of ``space``, ``metric`` and ``mode`` at once (a ValueError), before
    any trial starts. Returns the width settings and their values."""
    problems = []
    if not isinstance(space, Mapping) or not space:
        raise ValueError("the search space is empty; give settings to try, e.g. "
                         "{'lr': tune.loguniform(1e-4, 1e-1), 'weight_decay': tune.choice([0.0, 1e-4])}")
    widths: dict[str, list[Any]] = {}
    head = split(model).unfrozen
    for key, value in space.items():
        if key.startswith(_WIDTH):
            vertex = key[len(_WIDTH):]
            values = _values(value)
            try:
                resolve(model, vertex)
                if is_frozen(model, vertex):
                    problems.append(f"{key}: vertex {vertex!r} is frozen; sweep widths of the trainable head only")
            except VertexError as exc:
                problems.append(f"{key}: {exc}")
                continue
            if values is None:
                problems.append(f"{key}: a width takes tune.choice([...]), tune.grid_search([...]) or a constant")
            elif not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
                problems.append(f"{key}: widths must be positive integers, got {values}")
            else:
                widths[vertex] = values
        elif key in _FTC_KEYS:
            candidates = _values(value) or _bounds(value)
            for v in candidates:
                try:
                    FineTuneConfiguration.from_dict({key: v})
                except ValueError as exc:
                    problems.append(f"{key}: {str(exc).split(': ', 1)[-1]}")
                    break
        elif key in TRAINING_KEYS:
            for v in _values(value) or _bounds(value):
                if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                    problems.append(f"{key}: must be positive integers, got {v!r}")
                    break
        else:
            problems.append(f"{key}: unknown setting; valid settings: {', '.join(_FTC_KEYS + TRAINING_KEYS)}, "
                            f"or {_WIDTH}<vertex> for a trainable layer's width")
    if metric not in SWEEP_METRICS or (metric.startswith("val_") and not has_validation):
        problems.append(f"metric {metric!r} is never reported; trials report {', '.join(SWEEP_METRICS)}")
    if mode not in ("min", "max"):
        problems.append(f"mode must be 'min' or 'max', got {mode!r}")
    if not any(p.requires_grad for p in head.parameters()):
        problems.append("the model has nothing trainable after its frozen boundary")
    if problems:
        raise ValueError("cannot sweep: " + "; ".join(problems))
    return widths


# ---------------------------------------------------------------------------------------
# the trial (runs in a Ray Tune actor)


def _width_key(config: Mapping[str, Any], vertices: list[str]) -> tuple:
    return tuple(config[f"{_WIDTH}{v}"] for v in vertices)


def _trial(config: dict[str, Any], *, heads: Any, data: Any, base: dict[str, Any]) -> None:
    from ray import tune

    from surgery.layers import Layer

    torch.set_num_threads(max(1, int(base["threads"])))
    torch.manual_seed(base["seed"])
    head = copy.deepcopy(heads[_width_key(config, base["widths"])])  # with_parameters resolved them from the object store
    tensors = data
    sampled = {k: config[k] for k in _FTC_KEYS if k in config}  # merged as the builder merges (a new updater replaces the old)
    ftc = FineTuneConfiguration.from_dict(base["fine_tune"])
    ftc = ftc.merged(FineTuneConfiguration.from_dict(sampled)) if sampled else ftc
    for module in head.modules():  # the fine-tune configuration's dropout, as the builder applies it
        if isinstance(module, Layer) and any(p.requires_grad for p in module.parameters()):
            module.default_dropout = ftc.dropout
    stopping = Stopping(config.get("epochs", base["epochs"]), config.get("patience", base["patience"]),
                        config.get("max_epochs", base["max_epochs"]), base.get("min_delta", 0.0))
    batch = int(config.get("batch_size", base["batch_size"]))
    specs = [LossSpec.from_dict(d) for d in base["losses"]]
    x, y = tensors["train"]
    train = tensor_batches(tuple(torch.from_numpy(v) for v in x), torch.from_numpy(y), batch, seed=base["seed"])
    vx, vy = tensors["validation"]
    val_batches = tensor_batches(tuple(torch.from_numpy(v) for v in vx), torch.from_numpy(vy), 1024, shuffle=False)
    optimizer = ftc.build_optimizer(head)
    scheduler = ftc.build_scheduler(optimizer, stopping.limit)
    metric, sign = base["metric"], (1.0 if base["mode"] == "min" else -1.0)
    best = [math.inf]

    def on_epoch(state: Any, metrics: dict[str, Any]) -> None:
        value = sign * float(metrics[metric])
        report = {k: v for k, v in metrics.items() if isinstance(v, (int, float, bool))}
        report["finished"] = state.finished(stopping)
        if value < best[0]:
            best[0] = value
            from ray.tune import Checkpoint
            from safetensors.torch import save_file

            with tempfile.TemporaryDirectory() as d:
                save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()},
                          os.path.join(d, "model.safetensors"))
                tune.report(report, checkpoint=Checkpoint.from_directory(d))
        else:
            tune.report(report)

    run_epochs(head, optimizer, scheduler, ftc, specs, train, validation=lambda: val_batches(0), stopping=stopping,
               on_epoch=on_epoch)


# ---------------------------------------------------------------------------------------
# the driver


def _variants(model: fx.GraphModule, widths: dict[str, list[Any]]) -> dict[tuple, fx.GraphModule]:
    """The full model for each combination of widths (the model itself when none)."""
    vertices = list(widths)
    out = {}
    for combo in itertools.product(*(widths[v] for v in vertices)):
        builder = TransferLearning(model)
        for vertex, n in zip(vertices, combo):
            builder.n_out_replace(vertex, int(n))
        variant = builder.build() if vertices else model
        if surgery.frozen_fingerprint(variant) != surgery.frozen_fingerprint(model):
            raise ValueError(f"changing the width of {', '.join(vertices)} changes the frozen part; sweep trainable layers")
        out[combo] = variant
    return out


def sweep(
    model: fx.GraphModule,
    features: str | FeatureSet,
    space: Mapping[str, Any],
    *,
    tuning: Tuning | None = None,
    validation: str | FeatureSet | float | None = None,
    stopping: Stopping | None = None,
    batches: Batches | None = None,
    run: Run | None = None,
) -> SweepResult:
    """Try many heads on one feature set with Ray Tune; return every trial and the best model.

    Args:
        model: a freezeray model whose frozen part made ``features``.
        features: a committed feature-set URI or :class:`FeatureSet`.
        space: settings to try (see the module docstring), e.g.
            ``{"lr": tune.loguniform(1e-4, 1e-1), "n_out.fc3": tune.choice([64, 256])}``.
        tuning: samples, the metric and mode that rank trials (``val_loss`` min,
            ``val_accuracy`` max, or the training ``loss``/``accuracy``), the scheduler,
            concurrency and GPUs (:class:`~pipeline.Tuning`).
        validation: a feature set or a fraction held out by a seeded split (default: a tenth).
        stopping, batches: as for :func:`pipeline.fit_head`, for settings the space leaves out.
        run: where Ray Tune keeps trial results and checkpoints (``name``, ``storage``,
            ``storage_options``; default ``~/ray_results/sweep-<time>``). A sweep under an
            existing name with the same definition (see :mod:`pipeline.runs`) is reused
            when it finished (no trial runs) and started again when it did not; with
            another definition it is refused unless ``overwrite``.

    Returns:
        a :class:`SweepResult`: ``table`` (a pandas DataFrame, best trial first),
        ``best_config`` and ``best_model``.

    Raises:
        ValueError: an empty space, an unknown setting, values a setting cannot take, or a
            metric the trials never report, all before any trial starts.
        RunMismatch: ``run.name`` holds a sweep with another definition (and not ``overwrite``).

    Example:
        >>> from ray import tune
        >>> result = pipeline.sweep(model, features, {"lr": tune.loguniform(1e-4, 1e-1),
        ...                                           "weight_decay": tune.choice([0.0, 1e-4])},
        ...                         tuning=Tuning(num_samples=16))
        >>> print(result.table.head())
    """
    started = time.perf_counter()
    tuning, stopping, batches, run = (tuning or Tuning(), stopping or Stopping(), (batches or Batches()).for_features(),
                                      run or Run())
    if run.max_failures or run.callback is not None or not batches.shuffle:
        raise ValueError("sweep's trials always shuffle and keep no worker failures or callbacks: "
                         "Batches(shuffle=False) and Run(max_failures=..., callback=...) are for fit_head and finetune")
    fset = open_features(features, run.storage_options)
    fset.check(model)
    if fset.rows == 0:
        raise ValueError(f"the feature set at {fset.uri!r} has zero rows: nothing to train on")
    specs = loss_specs(model)
    check_targets(specs, len(fset.classes) or None)
    validation = AUTO_VALIDATION if validation is None else validation
    widths = _check_space(space, model, tuning.metric, tuning.mode, has_validation=True)
    seed = seed_of(model, batches.seed)
    sampled = _sample(fset, seed)
    data, val_set = _sweep_data(model, fset, sampled, validation, seed, run.storage_options)
    where, name = run.storage or default_storage(), run_name(run.name, "sweep")
    definition = {**model_definition(model, split(model).unfrozen), "features": features_definition(fset),
                  "validation": data_definition(validation if isinstance(validation, float) else val_set),
                  "fine_tune": fine_tune_definition(model), "space": describe(dict(space)),
                  "num_samples": tuning.num_samples, "metric": tuning.metric, "mode": tuning.mode,
                  "epochs": stopping.epochs, "batch_size": batches.batch_size,
                  "early_stopping_patience": stopping.patience, "max_epochs": stopping.max_epochs,
                  "scheduler": tuning.scheduler, "seed": seed}
    variants, vertices = _variants(model, widths), list(widths)
    if claim_run(where, name, "sweep", definition, run.storage_options, run.overwrite):
        done = _load_result(_storage.join(where, name), model, vertices, run.storage_options, started)
        if done is not None:
            log.info("sweep %s: finished before with this definition; reused (no trial ran)", name)
            return done
        restart_run(where, name, "sweep", definition, run.storage_options)  # interrupted: it starts again
    ftc = surgery.get_info(model).fine_tune or FineTuneConfiguration()
    base = {
        "seed": seed, "fine_tune": ftc.to_dict(), "epochs": stopping.epochs, "patience": stopping.patience,
        "max_epochs": stopping.max_epochs, "min_delta": stopping.min_delta, "losses": [s.to_dict() for s in specs],
        "metric": tuning.metric, "mode": tuning.mode, "widths": vertices, "threads": 1,
        "batch_size": batches.batch_size or default_batch_size(len(data["train"][1])),
    }
    grid = _tune(variants, data, base, space, tuning, stopping, where, name, run.storage_options)
    out, weights = _collect(grid, space, tuning.metric, tuning.mode, variants, vertices, started)
    if sampled is not fset:  # trials ran on a sample: the best configuration is trained again on every row
        out, weights = _refit(out, variants[_width_key({**out.best_config}, vertices)], fset, validation,
                              Run(name=f"{name}-refit", storage=where, storage_options=run.storage_options), seed,
                              base, tuning.use_gpu)
    _save_result(_storage.join(where, name), out, weights, run.storage_options)
    log.info("sweep %s: %d trials in %.1fs; best %s=%.4f with %s", name, len(out.table), out.seconds, tuning.metric,
             out.best_metrics[tuning.metric], out.best_config)
    return out


def _sweep_data(model: fx.GraphModule, fset: FeatureSet, sampled: FeatureSet, validation: Any, seed: int,
                storage_options: dict | None) -> tuple[dict[str, Any], FeatureSet | None]:
    """The trials' training and validation arrays (read once on the driver), and the
    validation feature set when one was given."""
    table = feature_tensors(sampled, fset.feature_columns)
    val_set = None
    if isinstance(validation, float):
        if not 0.0 < validation < 1.0:
            raise ValueError(f"validation as a fraction must be in (0, 1), got {validation}")
        train_part, val_part = (split_rows(table, validation, seed, k) for k in ("train", "validation"))
    else:
        val_set = open_features(validation, storage_options)
        val_set.check(model)
        train_part, val_part = table, feature_tensors(val_set, fset.feature_columns)
    data = {key: _arrays(part, fset.feature_columns) for key, part in (("train", train_part), ("validation", val_part))}
    return data, val_set


def _tune(variants: dict[tuple, fx.GraphModule], data: dict[str, Any], base: dict[str, Any], space: Mapping[str, Any],
          tuning: Tuning, stopping: Stopping, where: str, name: str, storage_options: dict | None) -> Any:
    """Ray Tune over the trials; its ``ResultGrid`` once every trial ended."""
    from ray import tune

    from .runtime import cluster_cpus, cluster_gpus, ensure_ray, pyarrow_filesystem

    ensure_ray()
    heads = {combo: split(m).unfrozen for combo, m in variants.items()}
    slots = int(cluster_gpus()) if tuning.use_gpu else int(cluster_cpus())
    concurrent = max(1, min(slots, tuning.max_concurrent_trials or slots))
    trainable = tune.with_parameters(_trial, heads=heads, data=data, base=base)  # put in the object store once
    trainable = tune.with_resources(trainable, {"cpu": 1, **({"gpu": 1} if tuning.use_gpu else {})})
    asha = None
    if tuning.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        asha = ASHAScheduler(max_t=stopping.limit, grace_period=min(4, stopping.limit), reduction_factor=2)
    fs, path = pyarrow_filesystem(where, storage_options)
    tuner = tune.Tuner(
        trainable,
        param_space=dict(space),
        tune_config=tune.TuneConfig(metric=tuning.metric, mode=tuning.mode, num_samples=tuning.num_samples,
                                    scheduler=asha, max_concurrent_trials=concurrent, reuse_actors=True),
        # every checkpoint a trial writes is its best epoch so far (the newest is the best); keeping
        # them all avoids the experiment snapshot Tune forces whenever num_to_keep prunes
        run_config=tune.RunConfig(name=name, storage_path=path, storage_filesystem=fs, verbose=0),
    )
    with _quiet_tune():
        grid = tuner.fit()
    errors = [r.error for r in grid if r.error is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(grid)} trials failed; the first: {errors[0]}")
    return grid


@contextlib.contextmanager
def _quiet_tune() -> Iterator[None]:
    """Ray Tune's progress tables print whatever ``verbose`` says under its new output
    engine; its classic reporter honours ``verbose=0``. Restored afterwards."""
    before = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = before


def _arrays(part: dict[str, np.ndarray], columns: tuple[str, ...]) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    order = np.argsort(np.asarray(part["row_id"]), kind="stable")
    x = tuple(np.ascontiguousarray(np.asarray(part[c])[order], dtype=np.float32) for c in columns)
    return x, np.asarray(part["label"])[order].astype(np.int64)


def _collect(grid: Any, space: Mapping[str, Any], metric: str, mode: str, variants: dict[tuple, fx.GraphModule],
             vertices: list[str], started: float) -> tuple[SweepResult, dict[str, torch.Tensor]]:
    """The result of a finished sweep, and the best trial's best weights."""
    import pandas as pd
    from safetensors.torch import load_file

    rows, curves, best = [], {}, None
    sign = 1.0 if mode == "min" else -1.0
    for result in grid:
        history = result.metrics_dataframe
        if history is None or history.empty or metric not in history:
            continue
        records = history.to_dict("records")
        trial = str(records[-1].get("trial_id") or result.path.rstrip("/").rsplit("/", 1)[-1])
        curves[trial] = records
        top = min(records, key=lambda r: sign * r[metric])
        last = records[-1]
        stopped = "patience" if last.get("stopped_early") else ("epochs" if last.get("finished") else "scheduler")
        settings = {k: result.config[k] for k in space}
        rows.append({"trial": trial, **settings, "epochs": len(records), "best_epoch": int(top["epoch"]),
                     **{m: top.get(m) for m in SWEEP_METRICS}, "ended_by": stopped})
        if best is None or sign * top[metric] < sign * best[1][metric]:
            best = (result, top, settings)
    if best is None:
        raise RuntimeError("no trial reported a result")
    table = pd.DataFrame(rows).sort_values(metric, ascending=mode == "min", kind="stable").reset_index(drop=True)
    result, top, settings = best
    with result.checkpoint.as_directory() as d:
        weights = load_file(os.path.join(d, "model.safetensors"))
    variant = variants[_width_key(result.config, vertices)]
    out = SweepResult(table, settings, _best_model(variant, settings, weights), top, metric, mode,
                      time.perf_counter() - started, curves)
    return out, weights


def _configured(variant: fx.GraphModule, settings: Mapping[str, Any]) -> fx.GraphModule:
    """A trial's model: its width variant with its fine-tune settings."""
    chosen = {k: v for k, v in settings.items() if k in _FTC_KEYS}
    return TransferLearning(variant).fine_tune_configuration(FineTuneConfiguration.from_dict(chosen)).build() \
        if chosen else copy.deepcopy(variant)


def _sample(fset: FeatureSet, seed: int) -> FeatureSet:
    """``fset`` itself when its features fit in memory (``fit_head``'s local-mode limit),
    else a seeded sample of its shards that does: trials train on the sample, and the best
    configuration is then trained on every row (:func:`_refit`)."""
    import math

    from .head import local_limit_bytes

    row_bytes = 4 * sum(math.prod(s) for s in fset.feature_shapes)
    limit = local_limit_bytes()
    if fset.rows * row_bytes <= limit:
        return fset
    order = np.random.default_rng([seed, 13]).permutation(len(fset.shards))
    chosen, rows = [], 0
    for i in order:
        shard = fset.shards[int(i)]
        if chosen and (rows + shard.rows) * row_bytes > limit:
            break
        chosen.append(shard)
        rows += shard.rows
    log.info("sweep: %d rows (%.1f GB as float32) are more than %.1f GB: trials train on a seeded sample of %d shards "
             "(%d rows); the best configuration is then trained on every row", fset.rows, fset.rows * row_bytes / 1e9,
             limit / 1e9, len(chosen), rows)
    manifest = fset.manifest.model_copy(update={"shards": sorted(chosen, key=lambda s: s.shard), "rows": rows})
    return FeatureSet(fset.uri, manifest, fset.storage_options)


def _refit(out: SweepResult, variant: fx.GraphModule, fset: FeatureSet, validation: Any, run: Run, seed: int,
           base: dict[str, Any], use_gpu: bool) -> tuple[SweepResult, dict]:
    """The best trial's configuration trained on the whole feature set (``fit_head``, run
    ``<sweep>-refit``): its model becomes the sweep's ``best_model``."""
    from .head import fit_head

    settings = out.best_config
    stopping = Stopping(settings.get("epochs", base["epochs"]), settings.get("patience", base["patience"]),
                        settings.get("max_epochs", base["max_epochs"]), base["min_delta"])
    fit = fit_head(_configured(variant, settings), fset, validation=validation, stopping=stopping,
                   batches=Batches(batch_size=settings.get("batch_size", None), seed=seed),
                   resources=Resources(use_gpu=use_gpu), run=run)
    out.best_model, out.refit = fit.model, fit
    return out, fit.model.state_dict()


def _best_model(variant: fx.GraphModule, settings: Mapping[str, Any], weights: dict[str, torch.Tensor]) -> fx.GraphModule:
    """The best trial's model: its width variant, its fine-tune settings, its best weights."""
    model = _configured(variant, settings)
    model.load_state_dict(weights, strict=False)
    model.eval()
    return model


# ---------------------------------------------------------------------------------------
# a finished sweep, kept for reuse (JSON and safetensors: nothing to unpickle)

_RESULT, _WEIGHTS = "freezeray-sweep.json", "freezeray-best.safetensors"


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else str(value)


def _save_result(uri: str, out: SweepResult, weights: dict[str, torch.Tensor], storage_options: dict | None) -> None:
    from safetensors.torch import save

    _storage.write_bytes(_storage.join(uri, _WEIGHTS), save({k: v.contiguous() for k, v in weights.items()}),
                        storage_options)
    data = {"table": out.table.to_dict("records"), "columns": list(out.table.columns), "best_config": out.best_config,
            "best_metrics": out.best_metrics, "metric": out.metric, "mode": out.mode, "seconds": out.seconds,
            "curves": out.curves}
    _storage.write_bytes(_storage.join(uri, _RESULT), json.dumps(data, default=_plain).encode(), storage_options)  # last


def _load_result(uri: str, model: fx.GraphModule, vertices: list[str], storage_options: dict | None,
                 started: float) -> SweepResult | None:
    """The result of a sweep that finished at ``uri``, or None."""
    import pandas as pd
    from safetensors.torch import load

    try:
        data = json.loads(_storage.read_bytes(_storage.join(uri, _RESULT), storage_options))
        weights = load(_storage.read_bytes(_storage.join(uri, _WEIGHTS), storage_options))
    except FileNotFoundError:
        return None
    settings = data["best_config"]
    variant = next(iter(_variants(model, {v: [settings[f"{_WIDTH}{v}"]] for v in vertices}).values()))
    table = pd.DataFrame(data["table"], columns=data["columns"])
    return SweepResult(table, settings, _best_model(variant, settings, weights), data["best_metrics"], data["metric"],
                       data["mode"], time.perf_counter() - started, data["curves"], reused=True)
