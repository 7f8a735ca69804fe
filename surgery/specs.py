"""Modules as data: how a module added by surgery is written into a recipe (:func:`describe`)
and built back (:func:`build_module`) without its weights. freezeray's layers and
vertices, common ``torch.nn`` layers, ``nn.Sequential`` of those, and builders registered
with :func:`register_layer` can be described; anything else makes a model that cannot be
saved as a recipe (``surgery.save`` says which module)."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from .layers import LAYER_TYPES, Layer

__all__ = ["register_layer", "describe", "build_module"]

_REGISTERED: dict[str, Callable[..., nn.Module]] = {}
_SPEC_ATTR = "_freezeray_spec"

# torch.nn classes a recipe can describe, with the constructor arguments read back from
# attributes of the same name (bias is a Parameter on the module, a bool in the constructor)
_TORCH_ARGS: dict[type, tuple[str, ...]] = {
    nn.Linear: ("in_features", "out_features", "bias"),
    nn.Conv1d: ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "bias", "padding_mode"),
    nn.Conv2d: ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "bias", "padding_mode"),
    nn.BatchNorm1d: ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    nn.BatchNorm2d: ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    nn.LayerNorm: ("normalized_shape", "eps", "elementwise_affine"),
    nn.Dropout: ("p",),
    nn.Dropout2d: ("p",),
    nn.ReLU: (), nn.ReLU6: (), nn.SiLU: (), nn.Tanh: (), nn.Sigmoid: (), nn.Identity: (), nn.Hardswish: (),
    nn.Mish: (), nn.SELU: (),
    nn.GELU: ("approximate",),
    nn.ELU: ("alpha",),
    nn.LeakyReLU: ("negative_slope",),
    nn.Softmax: ("dim",),
    nn.LogSoftmax: ("dim",),
    nn.Flatten: ("start_dim", "end_dim"),
    nn.AdaptiveAvgPool2d: ("output_size",),
    nn.AdaptiveMaxPool2d: ("output_size",),
    nn.MaxPool2d: ("kernel_size", "stride", "padding", "dilation", "ceil_mode"),
    nn.AvgPool2d: ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"),
    nn.LazyLinear: ("out_features", "bias"),
}
_TORCH_BY_NAME = {f"torch.nn.{cls.__name__}": cls for cls in _TORCH_ARGS}


def register_layer(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a function that builds a module from keyword arguments, so that modules
    it builds can be written into a recipe and rebuilt by ``surgery.load``.

    A name can be registered once; a duplicate is an error.

    Example:
        >>> @register_layer("my_head")
        ... def my_head(n_out: int) -> nn.Module:
        ...     return nn.Sequential(nn.Flatten(), nn.LazyLinear(n_out))
        >>> builder.add_layer("head", my_head(n_out=5), "global_pool")
    """
    if name in _REGISTERED:
        raise ValueError(f"a layer builder named {name!r} is already registered")

    def decorate(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        def build(**kwargs: Any) -> nn.Module:
            module = fn(**kwargs)
            setattr(module, _SPEC_ATTR, {"type": "registered", "name": name, "kwargs": kwargs})
            return module

        build.__name__ = getattr(fn, "__name__", name)
        build.__doc__ = fn.__doc__
        _REGISTERED[name] = build
        return build

    return decorate


def describe(module: nn.Module) -> dict[str, Any] | None:
    """A JSON-able spec that :func:`build_module` turns back into an equivalent module
    (without its weights), or None when a recipe cannot describe ``module``."""
    from . import vertices

    if isinstance(module, (Layer, vertices.GraphVertex)):
        return module.to_dict()
    spec = getattr(module, _SPEC_ATTR, None)
    if spec is not None:
        return spec
    if type(module) is nn.Sequential:
        children = [describe(m) for m in module]
        return None if any(c is None for c in children) else {"type": "torch.nn.Sequential", "children": children}
    args = _TORCH_ARGS.get(type(module))
    if args is None:
        return None
    kwargs: dict[str, Any] = {}
    for a in args:
        value = getattr(module, a)
        if a == "bias":
            value = value is not None
        elif isinstance(value, tuple):
            value = list(value)
        kwargs[a] = value
    return {"type": f"torch.nn.{type(module).__name__}", "kwargs": kwargs}


def build_module(spec: dict[str, Any]) -> nn.Module:
    """Build a module from a :func:`describe` spec. Raises ``ValueError`` for a spec that
    names an unknown type."""
    from . import vertices

    kind = spec.get("type")
    if kind in LAYER_TYPES:
        return LAYER_TYPES[kind](**{k: v for k, v in spec.items() if k != "type"})
    if kind in vertices.VERTEX_TYPES:
        return vertices.VERTEX_TYPES[kind].from_dict(spec)
    if kind == "registered":
        if spec["name"] not in _REGISTERED:
            raise ValueError(
                f"the recipe uses the layer builder {spec['name']!r}, which is not registered in this process; "
                f"import the module that registers it first (registered: {', '.join(sorted(_REGISTERED)) or 'none'})"
            )
        return _REGISTERED[spec["name"]](**spec.get("kwargs", {}))
    if kind == "torch.nn.Sequential":
        return nn.Sequential(*[build_module(c) for c in spec["children"]])
    if kind in _TORCH_BY_NAME:
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.get("kwargs", {}).items()}
        return _TORCH_BY_NAME[kind](**kwargs)
    raise ValueError(
        f"unknown layer type {kind!r} in a recipe; valid types: "
        f"{', '.join(list(LAYER_TYPES) + list(vertices.VERTEX_TYPES) + ['registered', 'torch.nn.Sequential'] + sorted(_TORCH_BY_NAME))}"
    )
