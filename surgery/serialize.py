"""``surgery.save`` / ``surgery.load``: a model as a folder (local or object storage)
holding ``model.safetensors`` (every parameter and buffer) and ``recipe.json`` (base
model, weights reference, surgery ops, frozen set, fine-tune configuration, losses,
preprocessing, classes and a fingerprint).

Loading rebuilds the base model without weights, replays the surgery, loads the
safetensors and restores the frozen set; nothing is ever unpickled. The recipe is
written last, so a folder with a recipe is complete.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch.fx as fx
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from . import storage, zoo
from .builder import _apply_dropout_defaults, apply_ops
from .finetune import FineTuneConfiguration
from .fingerprint import fingerprint
from .freeze import apply_frozen_
from .preprocess import PreprocessConfig
from .recipe import RECIPE_FORMAT, get_info, set_info_
from .weights import WeightsError, load_into_

__all__ = ["save", "load", "recipe_of"]

log = logging.getLogger(__name__)

RECIPE_FILE = "recipe.json"
WEIGHTS_FILE = "model.safetensors"
ONNX_FILE = "base.onnx"  # the ONNX graph of a model made by import_onnx


def recipe_of(model: fx.GraphModule) -> dict[str, Any]:
    """``model``'s recipe as a JSON-able dict.

    Raises:
        ValueError: the model holds a module that a recipe cannot describe.
    """
    info = get_info(model)
    problems = info.describable()
    if problems:
        raise ValueError("cannot save this model as a recipe: " + "; ".join(problems))
    return {
        "format": RECIPE_FORMAT,
        "base": {"name": info.name, "weights": info.weights, "kwargs": info.base_kwargs, "origin": info.origin},
        "stages": [[op.to_dict() for op in stage] for stage in info.stages],
        "frozen": list(info.frozen),
        "fine_tune": info.fine_tune.to_dict() if info.fine_tune else None,
        "losses": info.losses,
        "preprocessing": info.preprocessing.to_dict(),
        "classes": list(info.classes) if info.classes is not None else None,
        "fingerprint": fingerprint(model),
    }


def save(model: fx.GraphModule, uri: str, storage_options: dict[str, Any] | None = None) -> str:
    """Write ``model`` to the folder ``uri`` (local path or object-storage URI).

    Returns:
        ``uri``.

    Example:
        >>> surgery.save(model, "s3://bucket/models/flowers", storage_options={...})
    """
    recipe = recipe_of(model)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    if recipe["base"]["origin"] == "onnx":  # the graph comes from the file: keep a copy with the model
        onnx_bytes = getattr(model, "meta", {}).get("freezeray_onnx") or storage.read_bytes(recipe["base"]["weights"],
                                                                                           storage_options)
        storage.write_bytes(storage.join(uri, ONNX_FILE), onnx_bytes, storage_options)
        recipe["base"]["weights"] = ONNX_FILE
    storage.write_bytes(storage.join(uri, WEIGHTS_FILE), st_save(state), storage_options)
    storage.write_bytes(storage.join(uri, RECIPE_FILE), json.dumps(recipe, indent=2).encode(), storage_options)
    log.info("saved %s (%s) to %s", recipe["base"]["name"], recipe["fingerprint"], uri)
    return uri


def load(uri: str, storage_options: dict[str, Any] | None = None, *, base: Any = None) -> fx.GraphModule:
    """Read a model written by :func:`save`: rebuild, replay the recipe, load the weights,
    restore the frozen set, and check the fingerprint.

    Args:
        uri: the folder :func:`save` wrote.
        storage_options: fsspec options for it.
        base: for a model made with :func:`surgery.from_module` from a module a recipe
            cannot describe: a new instance of that module's class (its weights are
            replaced by the saved ones).

    Raises:
        FileNotFoundError: ``uri`` holds no recipe.
        WeightsError: the weights do not fit the rebuilt model.
        ValueError: a ``from_module`` model without ``base``.
    """
    try:
        recipe = json.loads(storage.read_bytes(storage.join(uri, RECIPE_FILE), storage_options))
    except FileNotFoundError:
        raise FileNotFoundError(f"no saved model at {uri!r} (missing {RECIPE_FILE})") from None
    if recipe.get("format") != RECIPE_FORMAT:
        raise ValueError(f"{uri!r}: unknown recipe format {recipe.get('format')!r}; expected {RECIPE_FORMAT!r}")
    model = _base_graph(uri, recipe, storage_options, base)
    for stage in recipe["stages"]:
        apply_ops(model, stage)
    state = st_load(storage.read_bytes(storage.join(uri, WEIGHTS_FILE), storage_options))
    load_into_(model, state, storage.join(uri, WEIGHTS_FILE))
    names = set(recipe["frozen"])
    unknown = names - {n.name for n in model.graph.nodes}
    if unknown:
        raise WeightsError(f"{uri!r}: the recipe freezes nodes the rebuilt model lacks: {sorted(unknown)[:10]}")
    apply_frozen_(model, {n for n in model.graph.nodes if n.name in names})
    info = get_info(model)
    set_info_(model, info.with_(
        weights=recipe["base"].get("weights"),
        fine_tune=FineTuneConfiguration.from_dict(recipe["fine_tune"]) if recipe.get("fine_tune") else None,
        losses=dict(recipe.get("losses", {})),
        preprocessing=PreprocessConfig.from_dict(recipe["preprocessing"]),
        classes=tuple(recipe["classes"]) if recipe.get("classes") is not None else None,
    ))
    _apply_dropout_defaults(model)
    model.eval()
    actual = fingerprint(model)
    if actual != recipe.get("fingerprint"):
        raise WeightsError(
            f"{uri!r}: the rebuilt model's fingerprint {actual} differs from the recipe's {recipe.get('fingerprint')}; "
            "the folder was changed after saving or was written by an incompatible version"
        )
    return model


def _base_graph(uri: str, recipe: dict[str, Any], storage_options: dict[str, Any] | None, base: Any) -> fx.GraphModule:
    """The graph a recipe starts from, without its trained weights."""
    spec = recipe["base"]
    origin = spec.get("origin", "zoo")
    preprocessing = PreprocessConfig.from_dict(recipe["preprocessing"])
    if origin == "onnx":
        from .onnx_import import import_onnx

        return import_onnx(storage.join(uri, ONNX_FILE), preprocessing=preprocessing, storage_options=storage_options,
                           name=spec["name"])
    if origin == "module":
        from .modules import from_module, rebuild

        module = rebuild(spec, base)
        recorded = set(spec.get("kwargs", {}).get("leaves", []))
        leaves = [t for t in {type(m) for m in module.modules()} if f"{t.__module__}.{t.__qualname__}" in recorded]
        return from_module(module, preprocessing=preprocessing, name=spec["name"], losses=recipe.get("losses"),
                           leaves=leaves)
    if origin != "zoo":
        raise ValueError(f"unknown model origin {origin!r} in the recipe; valid: zoo, module, onnx")
    # weights=None, uninitialised: the saved safetensors overwrite every tensor
    return zoo._load(spec["name"], None, None, dict(spec.get("kwargs", {})), initialize=False)
