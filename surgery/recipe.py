"""What a freezeray model carries besides its graph and weights: where it came from, the
surgery done to it, what is frozen, its fine-tune configuration, losses and preprocessing.

This travels with the ``GraphModule`` (in ``model.meta``, which ``copy.deepcopy`` keeps,
and as an attribute, which pickling keeps) and is what ``surgery.save`` writes as JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal, overload

import torch.fx as fx

from freezeray.images import PreprocessConfig

if TYPE_CHECKING:
    from .training.config import FineTuneConfiguration

__all__ = ["ModelInfo", "get_info", "set_info_", "model_preprocessing", "RECIPE_FORMAT"]

RECIPE_FORMAT = "freezeray.recipe/1"
_KEY = "freezeray"
_ATTR = "_freezeray_info"


@dataclass(frozen=True)
class ModelInfo:
    """The recipe of a model, as data."""

    name: str  # zoo name of the base model (or the module's name, for from_module and import_onnx)
    weights: str | None  # the base weights as asked for: None, "imagenet", an enum name, or a path/URI
    base_kwargs: dict[str, Any] = field(default_factory=dict)  # extra arguments given to zoo.load
    stages: tuple[tuple[Any, ...], ...] = ()  # builder ops (surgery.edits objects), one tuple per build()
    frozen: tuple[str, ...] = ()  # names of the frozen graph nodes
    fine_tune: "FineTuneConfiguration | None" = None  # optimizer settings for the trainable part
    losses: dict[str, str] = field(default_factory=dict)  # output vertex -> loss name
    preprocessing: PreprocessConfig = field(default_factory=PreprocessConfig)  # how images become inputs
    classes: tuple[str, ...] | None = None  # class names of the (first) output, when known
    origin: str = "zoo"  # where the base graph comes from: "zoo", "module" (from_module) or "onnx" (import_onnx)

    def with_(self, **changes: Any) -> "ModelInfo":
        return replace(self, **changes)

    def describable(self) -> list[str]:
        """Problems that stop this recipe from being written as data (empty when none)."""
        problems = []
        for stage in self.stages:
            for op in stage:
                if op.op in ("add_layer", "add_vertex") and op.spec() is None:
                    problems.append(
                        f"{op.op}({op.name!r}) used a {op.layer_class or 'module'}, which a recipe "
                        "cannot describe; use surgery.layers.Dense/Output/Convolution, a plain torch.nn layer, "
                        "or register a builder with surgery.specs.register_layer"
                    )
        return problems


@overload
def get_info(model: Any, required: Literal[True] = True) -> ModelInfo: ...


@overload
def get_info(model: Any, required: bool) -> ModelInfo | None: ...


def get_info(model: Any, required: bool = True) -> ModelInfo | None:
    """The :class:`ModelInfo` of ``model``; a ``TypeError`` when it has none and ``required``."""
    # copy.deepcopy keeps model.meta but not plain attributes; pickling keeps attributes but
    # not model.meta. Whichever survived is written back to the other.
    meta = getattr(model, "meta", None)
    info = meta.get(_KEY) if isinstance(meta, dict) else None
    if info is None:
        info = model.__dict__.get(_ATTR)
    if info is not None:
        set_info_(model, info)
    elif required:
        raise TypeError(
            f"{type(model).__name__} is not a freezeray model; start from surgery.zoo.load(...) "
            "or surgery.from_module(module, preprocessing)"
        )
    return info


def set_info_(model: fx.GraphModule, info: ModelInfo) -> None:
    """Attach ``info`` to ``model``. This is done in place."""
    if not isinstance(getattr(model, "meta", None), dict):
        model.meta = {}
    model.meta[_KEY] = info
    model.__dict__[_ATTR] = info


def model_preprocessing(model: Any, override: PreprocessConfig | dict | None = None,
                        image_size: int | None = None) -> PreprocessConfig:
    """``model``'s preprocessing, replaced by ``override`` (a config, or some of its fields)
    and/or resized to ``image_size``."""
    config = get_info(model).preprocessing
    if isinstance(override, dict):
        config = PreprocessConfig.from_dict({**config.to_dict(), **override})
    elif isinstance(override, PreprocessConfig):
        config = override
    if image_size is not None:
        config = config.with_size(int(image_size))
    return config
