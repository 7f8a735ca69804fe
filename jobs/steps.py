"""The steps of a run, each driven by a :class:`~jobs.config.RunConfig`: build the model,
featurize, fit the head (or fine-tune), evaluate, predict, save. ``run_all`` chains them
and writes the report. Nothing here knows about argument parsing or printing."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

import pipeline
import surgery
from surgery import FineTuneConfiguration, TransferLearning, storage
from surgery.layers import build_module
from surgery.recipe import set_info_

from .config import RunConfig

__all__ = ["connect", "build_model", "featurize_step", "fit_step", "finetune_step", "evaluate_step", "predict_step",
           "run_all", "RunOutcome", "resolve"]

log = logging.getLogger(__name__)


@dataclass
class RunOutcome:
    """What a run produced, for the report and the CLI's last lines."""

    config: RunConfig
    model: fx.GraphModule | None = None
    features: dict[str, pipeline.FeatureSet] = field(default_factory=dict)
    fit: pipeline.FitResult | None = None
    evaluation: pipeline.EvalResult | None = None
    predictions: pipeline.PredictResult | None = None
    timings: dict[str, float] = field(default_factory=dict)  # seconds per step
    model_uri: str | None = None
    report_uri: str | None = None


def resolve(cfg: RunConfig, uri: str | None) -> str | None:
    """A config path as a URI: relative local paths are relative to the working directory."""
    if uri is None or "://" in uri or os.path.isabs(uri):
        return uri
    return os.path.abspath(os.path.join(cfg.base_dir or os.getcwd(), uri))


def connect(verbose: bool = False) -> None:
    """Join the cluster in ``RAY_ADDRESS``, or start a local Ray."""
    from ray.data import DataContext

    from pipeline.runtime import ensure_ray

    ensure_ray(log_to_driver=verbose)
    DataContext.get_current().enable_progress_bars = True


def build_model(cfg: RunConfig) -> fx.GraphModule:
    """The base model (zoo or saved) with the config's surgery and fine-tune configuration."""
    opts = cfg.data.storage_options or None
    if cfg.model.load is not None:
        model = surgery.load(resolve(cfg, cfg.model.load), storage_options=opts)
    else:
        weights = cfg.model.weights
        if weights not in (None, "imagenet"):
            weights = resolve(cfg, weights)
        model = surgery.zoo.load(cfg.model.base, weights=weights, storage_options=opts, **cfg.model.kwargs)
    if not cfg.surgery and cfg.fine_tune is None:
        return model
    builder = TransferLearning(model)
    if cfg.fine_tune is not None:
        builder.fine_tune_configuration(FineTuneConfiguration.from_dict(cfg.fine_tune))
    for op in cfg.surgery:
        (name, args), = op.items()
        if name in ("set_feature_extractor", "freeze", "unfreeze", "set_outputs"):
            getattr(builder, name)(*args)
        elif name in ("remove_vertex_keep_connections", "remove_vertex_and_connections"):
            getattr(builder, name)(args)
        elif name in ("n_out_replace", "n_in_replace"):
            getattr(builder, name)(**args)
        else:
            key = "layer" if name == "add_layer" else "vertex"
            getattr(builder, name)(args["name"], build_module(args[key]), *args.get("inputs", []))
    return builder.build()


def _feature_uri(cfg: RunConfig, split: str) -> str:
    return storage.join(resolve(cfg, cfg.featurize.output), split)


def featurize_step(cfg: RunConfig, model: fx.GraphModule) -> dict[str, pipeline.FeatureSet]:
    """Featurize every image split the config names (train, validation, test)."""
    f, opts = cfg.featurize, cfg.data.storage_options or None
    splits = {"train": cfg.data.train, "test": cfg.data.test}
    if isinstance(cfg.data.validation, str):
        splits["validation"] = cfg.data.validation
    out = {}
    classes = None
    for split, uri in splits.items():
        if uri is None:
            continue
        src = pipeline.read_images(resolve(cfg, uri), opts, classes=classes)
        classes = classes or src.classes
        out[split] = pipeline.featurize(
            model, src, _feature_uri(cfg, split), storage_options=opts, boundary=f.boundary, image_size=f.image_size,
            dtype=f.dtype, batch_size=f.batch_size, num_actors=f.num_actors, num_gpus=f.num_gpus,
            cpus_per_actor=f.cpus_per_actor, shard_rows=f.shard_rows, overwrite=f.overwrite,
        )
    return out


def _open_features(cfg: RunConfig, split: str) -> pipeline.FeatureSet:
    try:
        return pipeline.FeatureSet.open(_feature_uri(cfg, split), cfg.data.storage_options or None)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no {split} features at {_feature_uri(cfg, split)}; run `freezeray featurize {cfg.source}` first"
        ) from None


def fit_step(cfg: RunConfig, model: fx.GraphModule, features: dict[str, pipeline.FeatureSet] | None = None) -> pipeline.FitResult:
    """``fit_head`` on the train features (validation: features, a fraction, or none)."""
    t, opts = cfg.training, cfg.data.storage_options or None
    features = features or {}
    train = features.get("train") or _open_features(cfg, "train")
    validation: Any = cfg.data.validation if isinstance(cfg.data.validation, float) else None
    if isinstance(cfg.data.validation, str):
        validation = features.get("validation") or _open_features(cfg, "validation")
    return pipeline.fit_head(
        model, train, validation=validation, epochs=t.epochs, batch_size=t.batch_size, num_workers=t.num_workers,
        use_gpu=t.use_gpu, cpus_per_worker=t.cpus_per_worker, storage=resolve(cfg, t.storage), name=t.run_name,
        storage_options=opts, shuffle=t.shuffle, seed=t.seed, early_stopping_patience=t.early_stopping_patience,
        max_failures=t.max_failures,
    )


def finetune_step(cfg: RunConfig, model: fx.GraphModule) -> pipeline.FitResult:
    t, opts = cfg.training, cfg.data.storage_options or None
    if cfg.data.train is None:
        raise ValueError(f"{cfg.source}: data.train is needed to fine-tune")
    return pipeline.finetune(
        model, resolve(cfg, cfg.data.train), validation=resolve(cfg, cfg.data.validation), epochs=t.epochs,
        batch_size=t.batch_size, num_workers=t.num_workers, use_gpu=t.use_gpu, cpus_per_worker=t.cpus_per_worker,
        augment=t.augment, image_size=cfg.featurize.image_size, storage=resolve(cfg, t.storage), name=t.run_name,
        storage_options=opts, shuffle=t.shuffle, seed=t.seed, early_stopping_patience=t.early_stopping_patience,
        max_failures=t.max_failures,
    )


def evaluate_step(cfg: RunConfig, model: fx.GraphModule, features: dict[str, pipeline.FeatureSet] | None = None,
                  classes: tuple[str, ...] | None = None) -> pipeline.EvalResult:
    """Evaluate on the test split: on its features when the head was trained on features
    and they fit the model, else on the images."""
    if cfg.data.test is None:
        raise ValueError(f"{cfg.source}: data.test is needed to evaluate")
    opts = cfg.data.storage_options or None
    test = (features or {}).get("test")
    if test is not None and cfg.training.mode == "head":
        try:
            return pipeline.evaluate(model, test, storage_options=opts)  # checks the features first
        except pipeline.FeatureMismatch:
            pass
    return pipeline.evaluate(model, resolve(cfg, cfg.data.test), storage_options=opts,
                             image_size=cfg.featurize.image_size, classes=classes)


def predict_step(cfg: RunConfig, model: fx.GraphModule) -> pipeline.PredictResult:
    opts = cfg.data.storage_options or None
    return pipeline.predict(model, resolve(cfg, cfg.data.predict), resolve(cfg, cfg.outputs.predictions),
                            storage_options=opts, image_size=cfg.featurize.image_size, overwrite=True)


def _with_classes(model: fx.GraphModule, classes: tuple[str, ...]) -> fx.GraphModule:
    """Record the training classes on the model, so predictions carry class names."""
    info = surgery.get_info(model)
    spec = surgery.loss_specs(model)[0]
    if spec.n_out == len(classes):
        set_info_(model, info.with_(classes=tuple(classes)))
    return model


def run_all(cfg: RunConfig) -> RunOutcome:
    """Build, featurize, train, evaluate, save, predict, and write the report."""
    from .report import write_report

    out = RunOutcome(cfg)
    opts = cfg.data.storage_options or None

    def timed(step: str, fn: Any, *args: Any) -> Any:
        start = time.perf_counter()
        value = fn(*args)
        out.timings[step] = time.perf_counter() - start
        return value

    model = timed("build", build_model, cfg)
    if cfg.data.train is not None:
        if cfg.training.mode == "head":
            out.features = timed("featurize", featurize_step, cfg, model)
            out.fit = timed("fit", fit_step, cfg, model, out.features)
        else:
            out.fit = timed("finetune", finetune_step, cfg, model)
        model = out.fit.model
        classes = out.features["train"].classes if "train" in out.features else \
            pipeline.read_images(resolve(cfg, cfg.data.train), opts).classes
        model = _with_classes(model, classes)
    else:
        classes = None
    out.model = model
    if cfg.data.test is not None:
        out.evaluation = timed("evaluate", evaluate_step, cfg, model, out.features, classes)
    if cfg.outputs.model is not None:
        out.model_uri = resolve(cfg, cfg.outputs.model)
        timed("save", surgery.save, model, out.model_uri, opts)
    if cfg.data.predict is not None:
        out.predictions = timed("predict", predict_step, cfg, model)
    if cfg.outputs.report is not None:
        out.report_uri = resolve(cfg, cfg.outputs.report)
        timed("report", write_report, out.report_uri, out, opts)
    return out
