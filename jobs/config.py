"""One YAML file describes a run: base model and weights, the surgery recipe (the
builder's ops as data, in any order), data URIs with storage options, featurization,
training (and a sweep), and outputs.

The schema is pydantic (:class:`RunConfig`) and shares its parts with the API: the
surgery ops are :mod:`surgery.edits`' (what the builder records and recipes store), the
fine-tune section is :class:`surgery.FineTuneConfiguration`, the ``resources`` sections
are :class:`pipeline.Resources`, and settings left out mean what the API's defaults mean
(``training.epochs`` left out: until the validation loss stops improving, as
``fit_head`` with ``Stopping()``). The ``training:`` keys stay flat (``epochs``,
``run_name``, ...); :class:`TrainingSection` builds the calls' grouped objects from them
(``stopping()``, ``batches()``, ``run()``; see :mod:`pipeline.options`), in one place.
Validation reports every problem at once, each with its path
(``training.epochs: input should be greater than 0, got -1``), before Ray starts.

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
    data: {train: data/train, test: data/test}
    featurize: {output: out/features, image_size: 96}
    training: {}                              # every default: local mode, early stopping
    outputs: {model: out/model, report: out/report}
    report: {baselines: true}                 # pixels and a random backbone beside the result
"""

from __future__ import annotations

import os
import re
from typing import Annotated, Any, Callable, Literal

import yaml
from pydantic import (
    BeforeValidator,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from freezeray.errors import InvalidInput
from freezeray.schema import Schema, SchemaError, problems_of
from pipeline.options import Batches, Run, Stopping, Tuning
from pipeline.resources import Resources
from pipeline.stages import Stage
from surgery.edits import SurgeryOp, from_short_form
from surgery.training import DEFAULT_MAX_EPOCHS
from surgery.training.config import FineTuneConfiguration

__all__ = ["RunConfig", "ConfigError", "load_config", "parse_config", "SweepSection", "ReportSection", "SPACE_FORMS"]

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
PositiveInt = Annotated[int, Field(gt=0)]


class ConfigError(InvalidInput, ValueError):
    """Every problem found in a config, one per line, each with its path."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source, self.problems = source, problems
        super().__init__(f"{source}: {len(problems)} problem{'s' if len(problems) != 1 else ''}:\n  " + "\n  ".join(problems))


class ModelSection(Schema):
    base: str | None = None  # zoo name, "timm/<architecture>" or "onnx" (None when starting from a saved model)
    weights: str | None = None  # None, "imagenet", an enum name (IMAGENET1K_V1), or a path/URI (the .onnx file for base: onnx)
    kwargs: dict[str, Any] = Field(default_factory=dict)  # passed to surgery.zoo.load
    load: str | None = None  # a saved model (surgery.save) to start from instead of the zoo

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSection":
        if (self.base is None) == (self.load is None):
            raise ValueError("give a zoo name in model.base or a saved model in model.load (one of them)")
        return self


class DataSection(Schema):
    train: str | None = None  # image folder or manifest for training
    validation: str | float | None = None  # images, or a fraction of train held out (head mode)
    test: str | None = None  # images to evaluate on
    predict: str | None = None  # images to predict
    storage_options: dict[str, Any] = Field(default_factory=dict)  # fsspec options for every URI (endpoint, credentials)
    allow_outside: bool = False  # manifests may list files outside their own folder (init's split manifests do)
    allow_empty: bool = False  # class folders without images stay classes (with no rows) instead of an error

    @field_validator("validation")
    @classmethod
    def _fraction(cls, v: Any) -> Any:
        if isinstance(v, float) and not 0.0 < v < 1.0:
            raise ValueError(f"a fraction of train must be in (0, 1), got {v}")
        return v


class FeaturizeSection(Schema):
    output: str | None = None  # folder for feature sets (one sub-folder per split)
    boundary: str | list[str] | None = None  # featurize at this vertex instead of the frozen set
    batch_size: PositiveInt = 64  # images per model call
    dtype: Literal["float16", "float32"] = "float16"  # feature dtype
    image_size: PositiveInt | None = None  # input size override
    shard_rows: PositiveInt | None = None  # rows per shard (None: by size)
    overwrite: bool = False  # replace features made with another fingerprint
    resources: Resources = Field(default_factory=Resources)  # model actors


# search-space forms a config may use, and the Ray Tune functions they become
SPACE_FORMS = {"loguniform": 2, "uniform": 2, "quniform": 3, "randint": 2, "choice": None, "grid": None}


class SweepSection(Schema):
    """``pipeline.sweep`` from a config: ``space`` maps a setting to ``{loguniform: [low,
    high]}``, ``{uniform: [low, high]}``, ``{quniform: [low, high, q]}``, ``{randint: [low,
    high]}``, ``{choice: [values]}``, ``{grid: [values]}`` or a constant."""

    space: dict[str, Any]  # setting -> search space (see above)
    num_samples: PositiveInt = 1  # samples of the space
    metric: Literal["val_loss", "val_accuracy", "loss", "accuracy"] = "val_loss"  # what ranks trials
    mode: Literal["min", "max"] = "min"
    scheduler: Literal["asha", "none"] = "asha"  # stop trailing trials early, or run all out

    @field_validator("space")
    @classmethod
    def _forms(cls, space: dict[str, Any]) -> dict[str, Any]:
        if not space:
            raise ValueError("the search space is empty; map settings to {loguniform: [low, high]}, {choice: [...]}, ...")
        for key, value in space.items():
            if isinstance(value, dict):
                if len(value) != 1 or next(iter(value)) not in SPACE_FORMS:
                    raise ValueError(f"{key}: a search space is one of {', '.join(SPACE_FORMS)} (as {{form: [...]}}), "
                                     f"got {value!r}")
                (form, args), = value.items()
                arity = SPACE_FORMS[form]
                if not isinstance(args, list) or (arity is not None and len(args) != arity) or not args:
                    raise ValueError(f"{key}: {form} takes a list of {arity or 'one or more'} values, got {args!r}")
        return space

    def tuning(self, use_gpu: bool) -> Tuning:
        """``num_samples``, ``metric``, ``mode`` and ``scheduler`` as ``sweep``'s :class:`Tuning`."""
        return Tuning(num_samples=self.num_samples, metric=self.metric, mode=self.mode,
                      scheduler=None if self.scheduler == "none" else self.scheduler, use_gpu=use_gpu)

    def tune_space(self) -> dict[str, Any]:
        """The space as Ray Tune search spaces."""
        from ray import tune

        out = {}
        for key, value in self.space.items():
            if not isinstance(value, dict):
                out[key] = value
                continue
            (form, args), = value.items()
            out[key] = tune.grid_search(args) if form == "grid" else \
                tune.choice(args) if form == "choice" else getattr(tune, form)(*args)
        return out


class TrainingSection(Schema):
    mode: Literal["head", "finetune"] = "head"  # fit_head on features, or finetune from images
    epochs: PositiveInt | None = None  # None: until the validation loss stops improving
    batch_size: PositiveInt | None = None  # None: fit_head's default_batch_size / finetune's 32
    early_stopping_patience: PositiveInt | None = None  # None: 20 with epochs left out, else off
    max_epochs: PositiveInt = DEFAULT_MAX_EPOCHS  # the bound when epochs is left out
    run_name: str | None = None  # same name and definition -> resume; None: a new run each time
    overwrite: bool = False  # a run_name used by a run with another definition: start it again instead of refusing
    storage: str | None = None  # checkpoints (None: ~/ray_results)
    max_failures: int = Field(default=0, ge=0)  # worker failures to survive
    shuffle: bool = True  # a fresh permutation every epoch
    seed: int | None = None  # None: the fine-tune configuration's seed, else 0
    augment: bool | list[str | dict[str, dict[str, Any] | None]] = True  # finetune: true (crop + flip), false, or transforms.v2 names
    stages: list[Stage] | None = None  # finetune: staged fine-tuning (the first stage on the features when featurize.output is set)
    resources: Resources = Field(default_factory=Resources)  # Ray Train workers (num_workers 0: local mode)
    sweep: SweepSection | None = None  # try many heads on the features (head mode)


    # the grouped objects of the training calls, built here only (pipeline.options)
    def stopping(self) -> Stopping:
        """``epochs``, ``early_stopping_patience`` and ``max_epochs`` as the calls' :class:`Stopping`."""
        return Stopping(self.epochs, self.early_stopping_patience, self.max_epochs)

    def batches(self, **more: Any) -> Batches:
        """``batch_size``, ``shuffle`` and ``seed`` (and ``more``, e.g. finetune's augmentation) as :class:`Batches`."""
        return Batches(batch_size=self.batch_size, shuffle=self.shuffle, seed=self.seed, **more)

    def run(self, storage: str | None, storage_options: dict[str, Any] | None,
            callback: Callable[[dict[str, Any]], None] | None = None) -> Run:
        """``run_name``, ``max_failures`` and ``overwrite`` with the resolved ``storage`` as :class:`Run`."""
        return Run(name=self.run_name, storage=storage, storage_options=storage_options,
                   max_failures=self.max_failures, overwrite=self.overwrite, callback=callback)

    @field_validator("augment")
    @classmethod
    def _augment(cls, v: Any) -> Any:
        from surgery.training.augment import check_augment

        check_augment(v)  # unknown transforms and bad arguments named now
        return v


class ReportSection(Schema):
    """What the report compares the transfer result with (see :mod:`jobs.baselines`)."""

    baselines: bool = True  # beside the transfer result: a linear model on downsampled pixels, the same head on a random backbone
    baseline_rows: PositiveInt = 2000  # at most this many train (and test) images for the baselines; larger sets are sampled


class OutputsSection(Schema):
    model: str | None = None  # where surgery.save writes the trained model
    report: str | None = None  # report folder
    predictions: str | None = None  # predictions folder (with data.predict)


def _short_op(v: Any) -> Any:
    return from_short_form(v)


class RunConfig(Schema):
    """A whole run, validated."""

    name: str = "run"  # names the report
    model: ModelSection
    surgery: list[Annotated[SurgeryOp, BeforeValidator(_short_op)]] = Field(default_factory=list)  # builder ops, any order
    fine_tune: FineTuneConfiguration | None = None  # the fine-tune configuration (DL4J semantics on a loaded model)
    data: DataSection = Field(default_factory=DataSection)
    featurize: FeaturizeSection = Field(default_factory=FeaturizeSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    outputs: OutputsSection = Field(default_factory=OutputsSection)
    report: ReportSection = Field(default_factory=ReportSection)  # baselines beside the result

    _raw: dict[str, Any] = PrivateAttr(default_factory=dict)  # the file as written (no secrets resolved)
    _source: str = PrivateAttr(default="")  # the file it came from
    _base_dir: str = PrivateAttr(default="")  # relative local paths are relative to this folder ("": the current one)

    @model_validator(mode="after")
    def _together(self) -> "RunConfig":
        problems = []
        if self.training.mode == "head" and self.data.train is not None and self.featurize.output is None:
            problems.append(("featurize.output", "required to train the head (training.mode: head) on features"))
        if self.data.predict is not None and self.outputs.predictions is None:
            problems.append(("outputs.predictions", "required when data.predict is set"))
        if self.training.mode == "finetune" and isinstance(self.data.validation, float):
            problems.append(("data.validation", "a fraction works with training.mode head; give an image folder for finetune"))
        if self.training.stages is not None and self.training.mode != "finetune":
            problems.append(("training.stages", "stages are a fine-tuning schedule: they need training.mode finetune"))
        if self.training.sweep is not None and self.training.mode != "head":
            problems.append(("training.sweep", "sweeps train heads on features: it needs training.mode head"))
        if problems:
            raise SchemaError("RunConfig", problems)
        return self

    @property
    def raw(self) -> dict[str, Any]:
        return self._raw

    @property
    def source(self) -> str:
        return self._source

    @property
    def base_dir(self) -> str:
        return self._base_dir

    def with_(self, **changes: Any) -> "RunConfig":
        """A copy with some sections or settings replaced (the source and raw file kept)."""
        out = self.model_copy(update=changes)
        out._raw, out._source, out._base_dir = self._raw, self._source, self._base_dir
        return out


def _resolve_env(value: Any, path: str, problems: list[str]) -> Any:
    if isinstance(value, dict):
        return {k: _resolve_env(v, f"{path}.{k}" if path else str(k), problems) for k, v in value.items()}
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


def parse_config(raw: dict[str, Any], source: str = "<config>", base_dir: str = "") -> RunConfig:
    """Validate a config mapping. Raises :class:`ConfigError` listing every problem."""
    if not isinstance(raw, dict):
        raise ConfigError(source, [f"the file must hold a mapping, got {type(raw).__name__}"])
    problems: list[str] = []
    resolved = _resolve_env(raw, "", problems)
    known = {"": list(RunConfig.model_fields)}
    try:
        cfg = RunConfig.model_validate(resolved)
    except ValidationError as exc:
        problems += [f"{p}: {m}" if p else m for p, m in problems_of(exc, known=known)]
        raise ConfigError(source, problems) from None
    if problems:
        raise ConfigError(source, problems)
    cfg._raw, cfg._source, cfg._base_dir = raw, source, base_dir
    return cfg


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
