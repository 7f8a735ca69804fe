"""``surgery.save`` / ``surgery.load``: a model as a folder (local or object storage)
holding ``model.safetensors`` (every parameter and buffer), ``probe.safetensors`` (a fixed
seeded input and the model's outputs on it) and ``recipe.json`` (base model, weights
reference, surgery ops, frozen set, fine-tune configuration, losses, preprocessing,
classes, the fingerprint and the weights' hash; see :mod:`surgery.fingerprint`).

Loading rebuilds the base model without weights, replays the surgery, loads the
safetensors and restores the frozen set; nothing is ever unpickled. It then checks the
model's identity: the weights' hash (a changed weight is refused), the fingerprint
(recipe + weights; a changed recipe is refused) and the probe (the rebuilt model's
outputs on the saved input, within :data:`~surgery.fingerprint.PROBE_TOLERANCE`; a real
change of computation is refused with its largest difference, or only warned about with
``probe="warn"``). None of these hash how code is printed, so a torch or timm release
that only changes FX's generated code or a module's ``extra_repr`` still loads. The
recipe is written last, so a folder with a recipe is complete.

Folders saved before identity scheme 2 (no ``identity`` in the recipe) load with their
weights checked by names and shapes only: their fingerprint hashed printed code.
"""

from __future__ import annotations

import json
import logging
import warnings
from typing import Any, Literal

import torch.fx as fx
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from freezeray import storage
from freezeray.images import PreprocessConfig

from . import zoo
from .builder import apply_dropout_defaults, apply_ops
from .fingerprint import IDENTITY_SCHEME, PROBE_TOLERANCE, ProbeMismatch, fingerprint, probe, probe_difference, weights_hash
from .freeze import apply_frozen_
from .graph import example_input
from .recipe import RECIPE_FORMAT, get_info, set_info_
from .training.config import FineTuneConfiguration
from .weights import WeightsError, load_into_

__all__ = ["save", "load", "recipe_of"]

log = logging.getLogger(__name__)

RECIPE_FILE = "recipe.json"
WEIGHTS_FILE = "model.safetensors"
PROBE_FILE = "probe.safetensors"  # the probe's input ("input") and the outputs on it ("output_0", ...)
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
    x = example_input(get_info(model).preprocessing.input_size, batch=1)
    outputs = probe(model, x)
    recipe["identity"] = {"scheme": IDENTITY_SCHEME, "weights": weights_hash(state),
                          "probe": {"file": PROBE_FILE, "outputs": len(outputs), **PROBE_TOLERANCE}}
    if recipe["base"]["origin"] == "onnx":  # the graph comes from the file: keep a copy with the model
        onnx_bytes = getattr(model, "meta", {}).get("freezeray_onnx") or storage.read_bytes(recipe["base"]["weights"],
                                                                                           storage_options)
        storage.write_bytes(storage.join(uri, ONNX_FILE), onnx_bytes, storage_options)
        recipe["base"]["weights"] = ONNX_FILE
    storage.write_bytes(storage.join(uri, WEIGHTS_FILE), st_save(state), storage_options)
    probe_tensors = {"input": x.contiguous(), **{f"output_{i}": o.contiguous() for i, o in enumerate(outputs)}}
    storage.write_bytes(storage.join(uri, PROBE_FILE), st_save(probe_tensors), storage_options)
    storage.write_bytes(storage.join(uri, RECIPE_FILE), json.dumps(recipe, indent=2).encode(), storage_options)
    log.info("saved %s (%s) to %s", recipe["base"]["name"], recipe["fingerprint"], uri)
    return uri


def load(uri: str, storage_options: dict[str, Any] | None = None, *, base: Any = None,
         probe_check: Literal["check", "warn"] = "check") -> fx.GraphModule:
    """Read a model written by :func:`save`: rebuild, replay the recipe, load the weights,
    restore the frozen set, and check its identity (weights' hash, fingerprint, probe).

    Args:
        uri: the folder :func:`save` wrote.
        storage_options: fsspec options for it.
        base: for a model made with :func:`surgery.from_module` from a module a recipe
            cannot describe: a new instance of that module's class (its weights are
            replaced by the saved ones).
        probe_check: ``"check"`` (the default) refuses a model whose outputs on the saved
            probe input differ by more than the tolerance; ``"warn"`` loads it with a
            warning naming the largest difference.

    Raises:
        FileNotFoundError: ``uri`` holds no recipe.
        WeightsError: the weights do not fit the rebuilt model, or are not the saved
            ones, or the recipe was changed after saving.
        ProbeMismatch: the rebuilt model computes something else (with ``"check"``).
        ValueError: a ``from_module`` model without ``base``.
    """
    if probe_check not in ("check", "warn"):
        raise ValueError(f"probe_check must be 'check' or 'warn', got {probe_check!r}")
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
    apply_dropout_defaults(model)
    model.eval()
    _check_identity(uri, recipe, model, storage_options, probe_check)
    return model


def _check_identity(uri: str, recipe: dict[str, Any], model: fx.GraphModule, storage_options: dict[str, Any] | None,
                    probe_check: str) -> None:
    """The loaded model is the saved one: same weights, same recipe, same outputs on the probe."""
    identity = recipe.get("identity")
    if not isinstance(identity, dict) or identity.get("scheme") != IDENTITY_SCHEME:
        log.info("%s was saved before identity scheme %s: its weights were checked by names and shapes only", uri,
                 IDENTITY_SCHEME)
        return
    actual = weights_hash(model.state_dict())
    if actual != identity.get("weights"):
        raise WeightsError(
            f"{uri!r}: the weights in {WEIGHTS_FILE} are not the ones saved (their fingerprint {actual} differs from the "
            f"recipe's {identity.get('weights')}); the file was changed after saving: save the model again"
        )
    actual = fingerprint(model)
    if actual != recipe.get("fingerprint"):
        raise WeightsError(
            f"{uri!r}: the rebuilt model's fingerprint {actual} differs from the recipe's {recipe.get('fingerprint')}; "
            f"the recipe ({RECIPE_FILE}) was changed after saving"
        )
    saved = st_load(storage.read_bytes(storage.join(uri, identity["probe"].get("file", PROBE_FILE)), storage_options))
    outputs = [saved[f"output_{i}"] for i in range(int(identity["probe"]["outputs"]))]
    tolerance = {k: float(identity["probe"][k]) for k in ("rtol", "atol") if k in identity["probe"]}
    ok, worst, allowed = probe_difference(probe(model, saved["input"]), outputs, tolerance)
    if ok:
        return
    message = (f"{uri!r}: the rebuilt model computes something else than the saved one: on the saved probe input its "
               f"outputs differ by up to {worst:.3g} (allowed: {allowed:.3g}, rtol {tolerance.get('rtol')} atol "
               f"{tolerance.get('atol')}); a library upgrade changed what a layer computes, or the base module's code changed")
    if probe_check == "warn":
        warnings.warn(message, stacklevel=3)
        return
    raise ProbeMismatch(message + "; surgery.load(uri, probe_check='warn') loads it anyway")


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
    return zoo.build_model(spec["name"], None, None, dict(spec.get("kwargs", {})), initialize=False)
