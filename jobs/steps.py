"""The steps of a run, each driven by a :class:`~jobs.config.RunConfig`: build the model,
featurize, fit the head (or sweep heads, or fine-tune), evaluate, predict, save.
``run_all`` chains them and writes the report. Nothing here parses arguments or prints;
progress goes to the ``progress`` callbacks the CLI passes."""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

import torch.fx as fx

import pipeline
import surgery
from freezeray import storage
from surgery import TransferLearning

from .baselines import Baseline, compute_baselines
from .config import RunConfig
from .errors import CliError
from .outcome import RunOutcome
from .report import write_report

__all__ = ["connect", "build_model", "featurize_step", "fit_step", "sweep_step", "finetune_step", "evaluate_step",
           "predict_step", "baselines_step", "run_all", "resolve", "read_source", "mark_outputs", "Progress", "WRITES", "OUTPUT_MARKER"]

log = logging.getLogger(__name__)

Progress = Callable[[str, dict[str, Any]], None]  # (step, event) -> None; events from the pipeline's callbacks

OUTPUT_MARKER = ".freezeray-output"  # an empty file at the root of every output folder the CLI creates
# the config paths each step writes to
WRITES = {"run": ("featurize.output", "training.storage", "outputs.model", "outputs.report", "outputs.predictions"),
          "featurize": ("featurize.output",), "fit": ("training.storage", "outputs.model"),
          "sweep": ("training.storage", "outputs.model"), "finetune": ("featurize.output", "training.storage",
                                                                       "outputs.model"),
          "predict": ("outputs.predictions",)}


def resolve(cfg: RunConfig, uri: str | None) -> str | None:
    """A config path as a URI: relative local paths are relative to the working directory."""
    if uri is None or "://" in uri or os.path.isabs(uri):
        return uri
    return os.path.abspath(os.path.join(cfg.base_dir or os.getcwd(), uri))


def connect(verbose: bool | None = None) -> None:
    """Join the cluster in ``RAY_ADDRESS``, or start a local Ray; Ray's own output and the
    workers' reach this terminal only when ``verbose`` (None: ``FREEZERAY_VERBOSE``)."""
    from pipeline.runtime import ensure_ray

    ensure_ray(log_to_driver=verbose)


def mark_outputs(cfg: RunConfig, step: str) -> list[str]:
    """Create each output folder ``step`` writes that does not exist yet, with an empty
    :data:`OUTPUT_MARKER` file at its root (image sources skip folders that hold one, so
    an output never becomes input). Folders that exist are left as they are. Returns the
    folders created."""
    made = []
    for key in WRITES.get(step, ()):
        section, name = key.split(".")
        uri = resolve(cfg, getattr(getattr(cfg, section), name))
        if uri is not None and not storage.exists(uri, _opts(cfg)):
            storage.write_bytes(storage.join(uri, OUTPUT_MARKER), b"", _opts(cfg))
            made.append(uri)
    return made


def read_source(cfg: RunConfig, uri: str, classes: tuple[str, ...] | None = None) -> Any:
    """The images at a config path, read as the config's data section says
    (``allow_outside``, ``allow_empty``)."""
    return pipeline.read_images(resolve(cfg, uri), _opts(cfg), classes=classes, allow_outside=cfg.data.allow_outside,
                                allow_empty=cfg.data.allow_empty)


def _opts(cfg: RunConfig) -> dict[str, Any] | None:
    return cfg.data.storage_options or None


def build_model(cfg: RunConfig) -> fx.GraphModule:
    """The base model (zoo or saved) with the config's surgery and fine-tune configuration."""
    if cfg.model.load is not None:
        model = surgery.load(resolve(cfg, cfg.model.load), storage_options=_opts(cfg))
    else:
        weights = cfg.model.weights
        if weights not in (None, "imagenet"):
            weights = resolve(cfg, weights)
        model = surgery.zoo.load(cfg.model.base, weights=weights, storage_options=_opts(cfg), **cfg.model.kwargs)
    if not cfg.surgery and cfg.fine_tune is None:
        return model
    builder = TransferLearning(model)
    if cfg.fine_tune is not None:
        builder.fine_tune_configuration(cfg.fine_tune)
    return builder.extend(list(cfg.surgery)).build()


def _feature_uri(cfg: RunConfig, split: str) -> str:
    return storage.join(resolve(cfg, cfg.featurize.output), split)


def _splits(cfg: RunConfig) -> dict[str, str]:
    splits = {"train": cfg.data.train, "test": cfg.data.test}
    if isinstance(cfg.data.validation, str):
        splits["validation"] = cfg.data.validation
    return {k: v for k, v in splits.items() if v is not None}


def featurize_step(cfg: RunConfig, model: fx.GraphModule, progress: Progress | None = None,
                   only: tuple[str, ...] | None = None) -> dict[str, pipeline.FeatureSet]:
    """Featurize every image split the config names (train, validation, test), or ``only`` those."""
    f, opts = cfg.featurize, _opts(cfg)
    out: dict[str, pipeline.FeatureSet] = {}
    classes = None
    for split, uri in _splits(cfg).items():
        if only is not None and split not in only:
            continue
        src = read_source(cfg, uri, classes)
        classes = classes or src.classes
        if progress is not None:
            progress(f"featurize {split}", {"event": "start", "total": src.rows, "unit": "images"})
        try:
            out[split] = pipeline.featurize(
                model, src, _feature_uri(cfg, split), storage_options=opts, boundary=f.boundary,
                image_size=f.image_size, dtype=f.dtype, batch_size=f.batch_size, resources=f.resources,
                shard_rows=f.shard_rows, overwrite=f.overwrite,
                progress=(lambda s, r, e, _n=f"featurize {split}": progress(_n, {"event": "rows", "rows": r + e}))
                if progress is not None else None,
            )
        except FileExistsError as exc:  # features of another fingerprint there (featurize refuses to mix them)
            raise CliError(5, f"featurize.output: {_feature_uri(cfg, split)} holds features made another way (another "
                              "model, boundary, preprocessing, dtype or set of images); rerun with --overwrite (or set "
                              f"featurize.overwrite: true in {cfg.source or 'the config'}) to replace them, or set another "
                              "featurize.output") from exc
        if progress is not None:
            progress(f"featurize {split}", {"event": "end", "reused": out[split].reused})
    return out


def _open_features(cfg: RunConfig, split: str) -> pipeline.FeatureSet:
    try:
        return pipeline.FeatureSet.open(_feature_uri(cfg, split), _opts(cfg))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no {split} features at {_feature_uri(cfg, split)}; run `freezeray featurize {cfg.source}` first"
        ) from None


def _validation(cfg: RunConfig, features: dict[str, pipeline.FeatureSet]) -> Any:
    if isinstance(cfg.data.validation, str):
        return features.get("validation") or _open_features(cfg, "validation")
    return cfg.data.validation  # a fraction or None


def fit_step(cfg: RunConfig, model: fx.GraphModule, features: dict[str, pipeline.FeatureSet] | None = None,
             progress: Progress | None = None) -> pipeline.FitResult:
    """``fit_head`` on the train features (validation: features, a fraction, or none)."""
    t, features = cfg.training, features or {}
    train = features.get("train") or _open_features(cfg, "train")
    callback = (lambda e: progress("fit", e)) if progress is not None else None
    result = pipeline.fit_head(model, train, validation=_validation(cfg, features), stopping=t.stopping(),
                               batches=t.batches(), resources=t.resources,
                               run=t.run(resolve(cfg, t.storage), _opts(cfg), callback))
    if progress is not None:
        progress("fit", {"event": "end"})
    return result


def sweep_step(cfg: RunConfig, model: fx.GraphModule, features: dict[str, pipeline.FeatureSet] | None = None) -> pipeline.SweepResult:
    """``sweep`` on the train features with the config's ``training.sweep``."""
    t, features = cfg.training, features or {}
    if t.sweep is None:
        raise ValueError(f"{cfg.source}: training.sweep is needed to sweep")
    train = features.get("train") or _open_features(cfg, "train")
    s = t.sweep
    return pipeline.sweep(model, train, s.tune_space(), tuning=s.tuning(bool(t.resources.use_gpu)),
                          validation=_validation(cfg, features), stopping=t.stopping(),
                          batches=pipeline.Batches(batch_size=t.batch_size, seed=t.seed),
                          run=t.run(resolve(cfg, t.storage), _opts(cfg)))


def finetune_step(cfg: RunConfig, model: fx.GraphModule, progress: Progress | None = None,
                  features: pipeline.FeatureSet | None = None) -> pipeline.FitResult:
    t = cfg.training
    if cfg.data.train is None:
        raise ValueError(f"{cfg.source}: data.train is needed to fine-tune")
    if features is None and t.stages and cfg.featurize.output is not None:  # the first stage trains on the features
        features = featurize_step(cfg, model, progress, ("train",))["train"]  # (reused when committed)
    callback = (lambda e: progress("finetune", e)) if progress is not None else None
    train = read_source(cfg, cfg.data.train)
    validation = read_source(cfg, cfg.data.validation, train.classes) if isinstance(cfg.data.validation, str) else None
    stages = t.stages
    if stages and features is not None:
        stages = [stages[0].model_copy(update={"features": features}), *stages[1:]]
    result = pipeline.finetune(model, train, validation=validation, stopping=t.stopping(),
                               batches=t.batches(augment=t.augment, image_size=cfg.featurize.image_size),
                               resources=t.resources, run=t.run(resolve(cfg, t.storage), _opts(cfg), callback),
                               stages=stages)
    if progress is not None:
        progress("finetune", {"event": "end"})
    return result


def evaluate_step(cfg: RunConfig, model: fx.GraphModule, features: dict[str, pipeline.FeatureSet] | None = None,
                  classes: tuple[str, ...] | None = None) -> pipeline.EvalResult:
    """Evaluate on the test split: on its features when the head was trained on features
    and they fit the model, else on the images."""
    if cfg.data.test is None:
        raise ValueError(f"{cfg.source}: data.test is needed to evaluate")
    test = (features or {}).get("test")
    if test is not None and cfg.training.mode == "head":
        try:
            return pipeline.evaluate(model, test, storage_options=_opts(cfg))  # checks the features first
        except pipeline.FeatureMismatch:
            pass
    return pipeline.evaluate(model, read_source(cfg, cfg.data.test, classes), storage_options=_opts(cfg),
                             image_size=cfg.featurize.image_size, classes=classes, resources=cfg.featurize.resources)


def predict_step(cfg: RunConfig, model: fx.GraphModule) -> pipeline.PredictResult:
    return pipeline.predict(model, read_source(cfg, cfg.data.predict), resolve(cfg, cfg.outputs.predictions),
                            storage_options=_opts(cfg), image_size=cfg.featurize.image_size, overwrite=True,
                            resources=cfg.featurize.resources)


def baselines_step(cfg: RunConfig, model: fx.GraphModule, progress: Progress | None = None) -> list[Baseline]:
    """The report's baselines (see :mod:`jobs.baselines`) for ``model`` as built, before
    training: their features beside the run's (``<featurize.output>/baselines``, else
    ``<outputs.report>/baselines``), their runs in ``runs/`` there (``training.storage``
    holds the run's own runs only)."""
    folder = cfg.featurize.output or cfg.outputs.report
    if folder is None:
        why = "set featurize.output or outputs.report: the baselines' features are kept there"
        return [Baseline(name, "", None, skipped=why) for name in ("pixels", "random backbone")]
    train = read_source(cfg, cfg.data.train)
    test = read_source(cfg, cfg.data.test, train.classes)
    where = storage.join(resolve(cfg, folder), "baselines")
    return compute_baselines(cfg, model, train, test, where, storage.join(where, "runs"), progress)


def _with_classes(model: fx.GraphModule, classes: tuple[str, ...]) -> fx.GraphModule:
    """Record the training classes on the model, so predictions carry class names."""
    from surgery.recipe import set_info_

    info = surgery.get_info(model)
    spec = surgery.loss_specs(model)[0]
    if spec.n_out == len(classes):
        set_info_(model, info.with_(classes=tuple(classes)))
    return model


def run_all(cfg: RunConfig, progress: Progress | None = None) -> RunOutcome:
    """Build, featurize, train (or sweep), evaluate, save, predict, and write the report."""
    out = RunOutcome(cfg)
    mark_outputs(cfg, "run")

    def timed(step: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        value = fn(*args, **kwargs)
        out.timings[step] = time.perf_counter() - start
        return value

    model = built = timed("build", build_model, cfg)
    classes = None
    if cfg.data.train is not None:
        if cfg.training.mode == "head":
            out.features = timed("featurize", featurize_step, cfg, model, progress)
            if cfg.training.sweep is not None:
                out.sweep = timed("sweep", sweep_step, cfg, model, out.features)
                model = out.sweep.best_model
            else:
                out.fit = timed("fit", fit_step, cfg, model, out.features, progress)
                model = out.fit.model
        else:
            features = None
            if cfg.training.stages and cfg.featurize.output is not None:  # the first stage trains on the features
                out.features = timed("featurize", featurize_step, cfg, model, progress, ("train",))
                features = out.features["train"]
            out.fit = timed("finetune", finetune_step, cfg, model, progress, features)
            model = out.fit.model
        classes = out.features["train"].classes if "train" in out.features else read_source(cfg, cfg.data.train).classes
        model = _with_classes(model, classes)
    out.model = model
    if cfg.data.test is not None:
        out.evaluation = timed("evaluate", evaluate_step, cfg, model, out.features, classes)
    if cfg.report.baselines and out.evaluation is not None and cfg.data.train is not None:
        out.baselines = timed("baselines", baselines_step, cfg, built, progress)
    if cfg.outputs.model is not None:
        out.model_uri = resolve(cfg, cfg.outputs.model)
        timed("save", surgery.save, model, out.model_uri, _opts(cfg))
    if cfg.data.predict is not None:
        out.predictions = timed("predict", predict_step, cfg, model)
    if cfg.outputs.report is not None:
        out.report_uri = resolve(cfg, cfg.outputs.report)
        timed("report", write_report, out.report_uri, out, _opts(cfg))
    return out
