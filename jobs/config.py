"""One YAML file describes a run: base model and weights, the surgery recipe (the
builder's ops as data, in any order), data URIs with storage options, featurization,
training, and outputs. Validation reports every problem at once, each with its path in
the file (``training.epochs: must be a positive integer, got -1``), before Ray starts.

Strings of the form ``${NAME}`` are read from the environment when the config is loaded
(credentials belong there); the resolved values are never written back out. Relative
paths are relative to the current directory (for ``ray job submit --working-dir .``, the
uploaded working directory), or to ``base_dir`` when one is given (the demo uses its own
folder).

Example::

    name: digits
    model: {base: efficientnet_lite0, weights: imagenet}
    surgery:
      - set_feature_extractor: [global_pool]
      - remove_vertex_keep_connections: classifier
      - add_layer: {name: classifier, layer: {type: Output, n_out: 10, loss: cross_entropy}}
    fine_tune: {updater: adam, lr: 0.003, seed: 0}
    data: {train: data/train, test: data/test}
    featurize: {output: out/features, image_size: 96}
    training: {num_workers: 2, epochs: 10, batch_size: 64}
    outputs: {model: out/model, report: out/report}
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

__all__ = ["RunConfig", "ConfigError", "load_config", "parse_config", "SURGERY_OPS"]

SURGERY_OPS = (
    "set_feature_extractor", "freeze", "unfreeze", "n_out_replace", "n_in_replace",
    "remove_vertex_keep_connections", "remove_vertex_and_connections", "add_layer", "add_vertex", "set_outputs",
)
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class ConfigError(ValueError):
    """Every problem found in a config, one per line, each with its path."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem{'s' if len(problems) != 1 else ''}:\n  " + "\n  ".join(problems))


@dataclass(frozen=True)
class ModelSection:
    base: str | None  # zoo name (None when starting from a saved model)
    weights: str | None  # None, "imagenet", or a path/URI
    kwargs: dict[str, Any]  # passed to surgery.zoo.load
    load: str | None  # a saved model (surgery.save) to start from instead of the zoo


@dataclass(frozen=True)
class DataSection:
    train: str | None  # image folder or manifest for training
    validation: str | float | None  # images, or a fraction of train held out (head mode)
    test: str | None  # images to evaluate on
    predict: str | None  # images to predict
    storage_options: dict[str, Any]  # fsspec options for every URI (endpoint, credentials)


@dataclass(frozen=True)
class FeaturizeSection:
    output: str | None  # folder for feature sets (one sub-folder per split)
    boundary: str | list[str] | None  # featurize at this vertex instead of the frozen set
    num_actors: int | None  # model actors (None: one per GPU, or one on CPU, see pipeline.featurize)
    num_gpus: float | None  # GPUs per actor (None: 1 when the cluster has GPUs)
    cpus_per_actor: float | None  # CPUs per actor (None: automatic)
    batch_size: int  # images per model call
    dtype: str  # float16 or float32
    image_size: int | None  # input size override
    shard_rows: int | None  # rows per shard (None: by size)
    overwrite: bool  # replace features made with another fingerprint


@dataclass(frozen=True)
class TrainingSection:
    mode: str  # "head" (fit_head on features) or "finetune" (whole model from images)
    num_workers: int
    use_gpu: bool
    cpus_per_worker: float
    epochs: int
    batch_size: int
    run_name: str | None  # same name -> resume; None: a new run each time
    storage: str | None  # checkpoints
    early_stopping_patience: int | None
    max_failures: int
    shuffle: bool
    seed: int | None
    augment: bool  # finetune: standard training augmentation


@dataclass(frozen=True)
class OutputsSection:
    model: str | None  # where surgery.save writes the trained model
    report: str | None  # report folder
    predictions: str | None  # predictions folder (with data.predict)


@dataclass(frozen=True)
class RunConfig:
    name: str
    model: ModelSection
    surgery: tuple[dict[str, Any], ...]  # ops as {op_name: args}
    fine_tune: dict[str, Any] | None
    data: DataSection
    featurize: FeaturizeSection
    training: TrainingSection
    outputs: OutputsSection
    raw: dict[str, Any] = field(repr=False, default_factory=dict)  # the file as written (no secrets resolved)
    source: str = ""  # the file it came from
    base_dir: str = ""  # relative local paths are relative to this folder ("" = the current directory)


class _Checker:
    """Reads typed values out of nested dicts, collecting problems with their paths."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def section(self, d: dict, key: str, known: set[str]) -> dict:
        value = d.get(key) or {}
        if not isinstance(value, dict):
            self.problems.append(f"{key}: must be a mapping, got {type(value).__name__}")
            return {}
        for extra in sorted(set(value) - known):
            self.problems.append(f"{key}.{extra}: unknown setting; valid settings: {', '.join(sorted(known))}")
        return value

    def value(self, d: dict, path: str, kind: str, default: Any = None, choices: tuple | None = None) -> Any:
        key = path.rsplit(".", 1)[-1]
        v = d.get(key, default)
        if v is None:
            return default
        ok = {
            "str": isinstance(v, str) and v != "",
            "bool": isinstance(v, bool),
            "int+": isinstance(v, int) and not isinstance(v, bool) and v > 0,
            "int0": isinstance(v, int) and not isinstance(v, bool) and v >= 0,
            "int": isinstance(v, int) and not isinstance(v, bool),
            "num+": isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
            "num0": isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0,
            "dict": isinstance(v, dict),
            "str|list": isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
            "str|frac": (isinstance(v, str) and v != "") or (isinstance(v, float) and 0 < v < 1),
        }[kind]
        words = {
            "str": "a non-empty string", "bool": "true or false", "int+": "a positive integer",
            "int0": "a non-negative integer", "int": "an integer", "num+": "a positive number",
            "num0": "a non-negative number", "dict": "a mapping", "str|list": "a string or a list of strings",
            "str|frac": "a path/URI or a fraction in (0, 1)",
        }[kind]
        if not ok:
            self.problems.append(f"{path}: must be {words}, got {v!r}")
            return default
        if choices is not None and v not in choices:
            self.problems.append(f"{path}: must be one of {', '.join(map(str, choices))}, got {v!r}")
            return default
        return v


def _resolve_env(value: Any, path: str, problems: list[str]) -> Any:
    if isinstance(value, dict):
        return {k: _resolve_env(v, f"{path}.{k}", problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_env(v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            name = m.group(1)
            if name not in os.environ:
                problems.append(f"{path}: environment variable {name} is not set")
                return ""
            return os.environ[name]

        return _ENV.sub(sub, value)
    return value


def _check_surgery(ops: Any, c: _Checker) -> tuple[dict[str, Any], ...]:
    from surgery.layers import build_module, parse_weight_init

    if ops is None:
        return ()
    if not isinstance(ops, list):
        c.problems.append(f"surgery: must be a list of ops, got {type(ops).__name__}")
        return ()
    out = []
    for i, op in enumerate(ops):
        path = f"surgery[{i}]"
        if not isinstance(op, dict) or len(op) != 1:
            c.problems.append(f"{path}: must be one op as {{op_name: arguments}}, got {op!r}")
            continue
        (name, args), = op.items()
        if name not in SURGERY_OPS:
            c.problems.append(f"{path}: unknown op {name!r}; valid ops: {', '.join(SURGERY_OPS)}")
            continue
        p = f"{path}.{name}"
        if name in ("set_feature_extractor", "freeze", "unfreeze", "set_outputs"):
            if isinstance(args, str):
                args = [args]
            if not (isinstance(args, list) and args and all(isinstance(a, str) for a in args)):
                c.problems.append(f"{p}: must be a vertex name or a list of them, got {args!r}")
                continue
        elif name in ("remove_vertex_keep_connections", "remove_vertex_and_connections"):
            if not isinstance(args, str):
                c.problems.append(f"{p}: must be a vertex name, got {args!r}")
                continue
        elif name in ("n_out_replace", "n_in_replace"):
            width = "n_out" if name == "n_out_replace" else "n_in"
            if not isinstance(args, dict) or not isinstance(args.get("vertex"), str):
                c.problems.append(f"{p}: must be a mapping with a 'vertex', got {args!r}")
                continue
            if not (isinstance(args.get(width), int) and args[width] > 0):
                c.problems.append(f"{p}.{width}: must be a positive integer, got {args.get(width)!r}")
            for key in ("weight_init", "fan_out_init"):
                if args.get(key) is not None:
                    try:
                        parse_weight_init(args[key])
                    except ValueError as exc:
                        c.problems.append(f"{p}.{key}: {exc}")
            allowed = {"vertex", width, "weight_init"} | ({"fan_out_init"} if name == "n_out_replace" else set())
            for extra in sorted(set(args) - allowed):
                c.problems.append(f"{p}.{extra}: unknown argument; valid: {', '.join(sorted(allowed))}")
        else:  # add_layer / add_vertex
            key = "layer" if name == "add_layer" else "vertex"
            if not isinstance(args, dict) or not isinstance(args.get("name"), str) or not isinstance(args.get(key), dict):
                c.problems.append(f"{p}: must be a mapping with 'name', '{key}' (a mapping) and 'inputs', got {args!r}")
                continue
            inputs = args.get("inputs", [])
            if isinstance(inputs, str):
                inputs = [inputs]
            if not (isinstance(inputs, list) and all(isinstance(x, str) for x in inputs)):
                c.problems.append(f"{p}.inputs: must be a vertex name or a list of them, got {inputs!r}")
            try:
                build_module(args[key])
            except (ValueError, TypeError) as exc:
                c.problems.append(f"{p}.{key}: {exc}")
            args = {**args, "inputs": inputs}
        out.append({name: args})
    return tuple(out)


def parse_config(raw: dict[str, Any], source: str = "<config>", base_dir: str = "") -> RunConfig:
    """Validate a config mapping. Raises :class:`ConfigError` listing every problem."""
    from surgery import FineTuneConfiguration

    c = _Checker()
    if not isinstance(raw, dict):
        raise ConfigError(source, [f"the file must hold a mapping, got {type(raw).__name__}"])
    top = {"name", "model", "surgery", "fine_tune", "data", "featurize", "training", "outputs"}
    for extra in sorted(set(raw) - top):
        c.problems.append(f"{extra}: unknown section; valid sections: {', '.join(sorted(top))}")
    env_problems: list[str] = []
    resolved = _resolve_env(raw, "", env_problems)
    c.problems += [p.lstrip(".") for p in env_problems]

    name = c.value(resolved, "name", "str", "run")
    m = c.section(resolved, "model", {"base", "weights", "kwargs", "load"})
    model = ModelSection(c.value(m, "model.base", "str"), c.value(m, "model.weights", "str"),
                         c.value(m, "model.kwargs", "dict", {}), c.value(m, "model.load", "str"))
    if model.base is None and model.load is None:
        c.problems.append("model: give a zoo name in model.base or a saved model in model.load")
    if model.base is not None and model.load is not None:
        c.problems.append("model: give model.base or model.load, not both")
    surgery_ops = _check_surgery(resolved.get("surgery"), c)

    fine_tune = resolved.get("fine_tune")
    if fine_tune is not None:
        if not isinstance(fine_tune, dict):
            c.problems.append(f"fine_tune: must be a mapping, got {fine_tune!r}")
            fine_tune = None
        else:
            try:
                FineTuneConfiguration.from_dict(fine_tune)
            except (ValueError, TypeError) as exc:
                c.problems.append(f"fine_tune: {str(exc).removeprefix('invalid FineTuneConfiguration: ')}")

    d = c.section(resolved, "data", {"train", "validation", "test", "predict", "storage_options"})
    data = DataSection(c.value(d, "data.train", "str"), c.value(d, "data.validation", "str|frac"),
                       c.value(d, "data.test", "str"), c.value(d, "data.predict", "str"),
                       c.value(d, "data.storage_options", "dict", {}))
    f = c.section(resolved, "featurize", {"output", "boundary", "num_actors", "num_gpus", "cpus_per_actor",
                                          "batch_size", "dtype", "image_size", "shard_rows", "overwrite"})
    feat = FeaturizeSection(
        c.value(f, "featurize.output", "str"), c.value(f, "featurize.boundary", "str|list"),
        c.value(f, "featurize.num_actors", "int+"), c.value(f, "featurize.num_gpus", "num0"),
        c.value(f, "featurize.cpus_per_actor", "num+"), c.value(f, "featurize.batch_size", "int+", 64),
        c.value(f, "featurize.dtype", "str", "float16", ("float16", "float32")),
        c.value(f, "featurize.image_size", "int+"), c.value(f, "featurize.shard_rows", "int+"),
        c.value(f, "featurize.overwrite", "bool", False),
    )
    t = c.section(resolved, "training", {"mode", "num_workers", "use_gpu", "cpus_per_worker", "epochs", "batch_size",
                                         "run_name", "storage", "early_stopping_patience", "max_failures", "shuffle",
                                         "seed", "augment"})
    training = TrainingSection(
        c.value(t, "training.mode", "str", "head", ("head", "finetune")),
        c.value(t, "training.num_workers", "int+", 2), c.value(t, "training.use_gpu", "bool", False),
        c.value(t, "training.cpus_per_worker", "num+", 1.0), c.value(t, "training.epochs", "int+", 10),
        c.value(t, "training.batch_size", "int+", 256), c.value(t, "training.run_name", "str"),
        c.value(t, "training.storage", "str"), c.value(t, "training.early_stopping_patience", "int+"),
        c.value(t, "training.max_failures", "int0", 0), c.value(t, "training.shuffle", "bool", True),
        c.value(t, "training.seed", "int"), c.value(t, "training.augment", "bool", True),
    )
    o = c.section(resolved, "outputs", {"model", "report", "predictions"})
    outputs = OutputsSection(c.value(o, "outputs.model", "str"), c.value(o, "outputs.report", "str"),
                             c.value(o, "outputs.predictions", "str"))
    if training.mode == "head" and data.train is not None and feat.output is None:
        c.problems.append("featurize.output: required to train the head (training.mode: head) on features")
    if data.predict is not None and outputs.predictions is None:
        c.problems.append("outputs.predictions: required when data.predict is set")
    if training.mode == "finetune" and isinstance(data.validation, float):
        c.problems.append("data.validation: a fraction works with training.mode head; give an image folder for finetune")
    if c.problems:
        raise ConfigError(source, c.problems)
    return RunConfig(name, model, surgery_ops, fine_tune, data, feat, training, outputs, raw, source, base_dir)


def load_config(path: str, base_dir: str = "") -> RunConfig:
    """Read and validate a YAML config file."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(path, ["the file does not exist"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError(path, [f"not valid YAML: {exc}"]) from None
    return parse_config(raw if raw is not None else {}, path, base_dir)
