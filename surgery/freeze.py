"""Freezing: which vertices of a model are frozen, and what frozen means.

Frozen means: no gradient (``requires_grad=False``), hence no optimizer state and no
weight decay or L1/L2 (see :class:`~surgery.training.config.FineTuneConfiguration`), and
BatchNorm and dropout in inference mode even while the rest of the model trains.
BatchNorm running statistics of a frozen layer therefore never change.
"""

from __future__ import annotations

from typing import Iterable

import torch.fx as fx
from torch import nn

from .graph import ancestors_closure, resolve, vertex_table
from .recipe import get_info, set_info_

__all__ = [
    "feature_extractor_nodes",
    "apply_frozen_",
    "freeze_",
    "unfreeze_",
    "frozen_nodes",
    "frozen_prefix",
    "is_frozen",
    "keep_inference_mode_",
]


def _keep_eval(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook on frozen modules: BatchNorm uses its running statistics and
    dropout is off, whatever mode the rest of the model is in."""
    if module.training:
        module.training = False


def _set_hook_(module: nn.Module, on: bool) -> None:
    hooks = module._forward_pre_hooks  # no public API lists hooks; this is torch's own dict
    present = [k for k, fn in hooks.items() if fn is _keep_eval]
    if on and not present:
        module.register_forward_pre_hook(_keep_eval)
    elif not on:
        for k in present:
            del hooks[k]


def keep_inference_mode_(modules: Iterable[nn.Module]) -> None:
    """Keep ``modules`` in inference mode (BatchNorm on its running statistics, dropout
    off) while the model trains, without freezing their parameters. This is done in
    place; :func:`apply_frozen_` clears it from unfrozen modules."""
    for module in modules:
        _set_hook_(module, True)


def feature_extractor_nodes(model: fx.GraphModule, vertices: Iterable[str]) -> set[fx.Node]:
    """The vertices' nodes and all their ancestors (DL4J's ``setFeatureExtractor``)."""
    table = vertex_table(model)
    members = [n for v in vertices for n in resolve(model, v, table).nodes]
    return ancestors_closure(members)


def apply_frozen_(model: fx.GraphModule, frozen: Iterable[fx.Node]) -> None:
    """Make exactly ``frozen`` (nodes) frozen and record it on the model. This is done in place.

    A module is frozen when any call of it is frozen; its parameters stop requiring
    gradients and it keeps inference behaviour in training mode.
    """
    frozen = set(frozen)
    frozen_modules: set[str] = set()
    frozen_attrs: set[str] = set()
    for n in model.graph.nodes:
        if n in frozen and n.op == "call_module":
            frozen_modules.add(str(n.target))
        elif n in frozen and n.op == "get_attr":
            frozen_attrs.add(str(n.target))
    frozen_module_objs = {id(model.get_submodule(t)) for t in frozen_modules}
    # every submodule inside a frozen module is frozen too
    inner: set[int] = set()
    for t in frozen_modules:
        inner.update(id(m) for m in model.get_submodule(t).modules())
    for _, module in model.named_modules():
        on = id(module) in inner or id(module) in frozen_module_objs
        _set_hook_(module, on)
        if module is model:
            continue
        for p in module.parameters(recurse=False):
            p.requires_grad_(not on)
    for p_name, p in model.named_parameters(recurse=False):  # parameters read by get_attr at top level
        p.requires_grad_(p_name not in frozen_attrs)
    params = dict(model.named_parameters())
    for t in frozen_attrs:
        if t in params:
            params[t].requires_grad_(False)
    info = get_info(model)
    set_info_(model, info.with_(frozen=tuple(n.name for n in model.graph.nodes if n in frozen)))


def frozen_nodes(model: fx.GraphModule) -> set[fx.Node]:
    """The nodes recorded as frozen on ``model``."""
    names = set(get_info(model).frozen)
    return {n for n in model.graph.nodes if n.name in names}


def is_frozen(model: fx.GraphModule, vertex: str) -> bool:
    """Whether every node of ``vertex`` is frozen."""
    names = set(get_info(model).frozen)
    return all(n.name in names for n in resolve(model, vertex).nodes)


def frozen_prefix(model: fx.GraphModule) -> set[fx.Node]:
    """The frozen nodes whose inputs are all frozen too (inputs count as frozen): the
    part of the graph whose output can be computed once and cached."""
    frozen = frozen_nodes(model)
    prefix: set[fx.Node] = set()
    for n in model.graph.nodes:
        if n.op == "placeholder" or (n in frozen and all(a in prefix for a in n.all_input_nodes)):
            prefix.add(n)
    # a placeholder that feeds nothing frozen is still part of the prefix: it is the input
    return prefix


def freeze_(model: fx.GraphModule, *vertices: str) -> fx.GraphModule:
    """Freeze ``vertices`` (only these, not their ancestors). This is done in place.

    Example:
        >>> surgery.freeze_(model, "block1_conv1", "block1_conv2")
    """
    table = vertex_table(model)
    extra = {n for v in vertices for n in resolve(model, v, table).nodes}
    apply_frozen_(model, frozen_nodes(model) | extra)
    return model


def unfreeze_(model: fx.GraphModule, *vertices: str) -> fx.GraphModule:
    """Unfreeze ``vertices``. This is done in place.

    Example:
        >>> surgery.unfreeze_(model, "block5")
    """
    table = vertex_table(model)
    drop = {n for v in vertices for n in resolve(model, v, table).nodes}
    apply_frozen_(model, frozen_nodes(model) - drop)
    return model

