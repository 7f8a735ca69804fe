"""``surgery.from_module``: any traceable ``nn.Module`` as a freezeray model.

The module is traced with the zoo's rules (:class:`surgery.graph.Tracer`: timm's no-trace
modules, torchvision's ``StochasticDepth`` and freezeray's layers stay leaves, plus the
``leaves`` given). Its vertices keep the module's names: the qualified names of its
submodules (for an ``nn.Sequential``, ``"0"``, ``"1"``, ...) and FX's names for the rest.
Outputs get the ``cross_entropy`` loss unless ``losses`` says otherwise.

Saving: a model made from a plain ``nn.Sequential`` of layers a recipe can describe
(:func:`surgery.specs.describe`) is saved as data and loads by itself; any other module
is code, which freezeray never imports from a recipe, so ``surgery.load(uri,
base=module)`` takes a fresh instance of the same class, replays the surgery and loads the
saved weights into it.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch.fx as fx
from torch import nn

from freezeray.errors import InvalidInput
from freezeray.images import PreprocessConfig

from .graph import Tracer, example_input, output_vertices, propagate_
from .recipe import ModelInfo, set_info_
from .specs import describe

__all__ = ["from_module", "TraceFailure"]

log = logging.getLogger(__name__)


class TraceFailure(InvalidInput, TypeError):
    """A module that torch.fx cannot trace, naming the submodule where it failed."""


class _NamingTracer(Tracer):
    """The zoo's tracer, remembering which submodule it is inside when tracing fails."""

    def __init__(self, leaves: Sequence[type] = ()) -> None:
        super().__init__()
        self._leaves = tuple(self._leaves) + tuple(leaves)
        self.failed: tuple[str, str] | None = None  # the innermost submodule tracing failed in

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed is None:
                self.failed = (self.path_of_module(m), type(m).__name__)
            raise


def _trace(module: nn.Module, name: str, leaves: Sequence[type]) -> fx.GraphModule:
    module.eval()
    tracer = _NamingTracer(leaves)
    try:
        graph = tracer.trace(module)
    except Exception as exc:  # torch.fx raises many types; all mean "cannot trace"
        where, cls = tracer.failed or ("", type(module).__name__)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        at = f"submodule {where!r} ({cls})" if where else f"the module's own forward ({cls})"
        raise TraceFailure(
            f"cannot trace {name} with torch.fx: {at} failed: {first}. Make it a leaf vertex, traced as one call: "
            f"surgery.from_module(module, preprocessing=..., leaves=[{cls}]) (or timm.layers.register_notrace_module("
            f"{cls}) for every model); its insides then cannot be edited"
        ) from None
    graph._tracer_cls = Tracer  # what unpickling retraces with (every module a leaf then)
    gm = fx.GraphModule(tracer.root, graph, name)
    gm.eval()
    return gm


def from_module(module: nn.Module, *, preprocessing: PreprocessConfig | dict[str, Any], name: str | None = None,
                losses: dict[str, str] | None = None, leaves: Sequence[type] = ()) -> fx.GraphModule:
    """``module`` as a freezeray model (a traced ``GraphModule`` carrying its preprocessing),
    ready for ``TransferLearning``, ``featurize``, ``fit_head`` and ``surgery.save``.

    Args:
        module: any ``nn.Module`` torch.fx can trace (its weights are kept).
        preprocessing: how images become its input (a :class:`PreprocessConfig` or its fields).
        name: the model's name in summaries and recipes (default: the class name).
        losses: output vertex -> loss name (default: ``cross_entropy`` for every output).
        leaves: module classes to keep as single vertices (not traced into).

    Raises:
        TraceFailure: the module cannot be traced; names the submodule and the fix.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
        >>> model = surgery.from_module(net, preprocessing={"input_size": (3, 32, 32)})
        >>> surgery.vertex_names(model)  # ['input_1', '0', '1', '2', '3', '4']
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"from_module takes a torch.nn.Module, got {type(module).__name__}")
    config = preprocessing if isinstance(preprocessing, PreprocessConfig) else PreprocessConfig.from_dict(dict(preprocessing))
    label = name or type(module).__name__
    gm = _trace(module, label, leaves)
    outputs = output_vertices(gm)
    # a Sequential's spec rebuilds children named 0, 1, ...: one with other names is code (load needs base=)
    indexed = type(module) is nn.Sequential and [n for n, _ in module.named_children()] == [str(i) for i in range(len(module))]
    spec = describe(module) if indexed else None
    kind = f"{type(module).__module__}.{type(module).__qualname__}"
    set_info_(gm, ModelInfo(name=label, weights=None, origin="module",
                            base_kwargs={"class": kind, **({"spec": spec} if spec is not None else {}),
                                         "leaves": [f"{c.__module__}.{c.__qualname__}" for c in leaves]},
                            preprocessing=config,
                            losses={v: (losses or {}).get(v, "cross_entropy") for v in outputs}))
    propagate_(gm, example_input(config.input_size))
    return gm


def rebuild(info_base: dict[str, Any], base: nn.Module | None, leaves: Sequence[type] = ()) -> nn.Module:
    """The module a saved ``from_module`` model started from: ``base`` (checked against the
    recorded class), or rebuilt from its recorded spec.

    Raises:
        ValueError: neither is available, or ``base`` is of another class.
    """
    from .specs import build_module

    kind = info_base.get("kwargs", {}).get("class", "?")
    if base is not None:
        actual = f"{type(base).__module__}.{type(base).__qualname__}"
        if actual != kind:
            raise ValueError(f"the saved model was made from a {kind}; base= is a {actual}")
        return base
    spec = info_base.get("kwargs", {}).get("spec")
    if spec is not None:
        return build_module(spec)
    raise ValueError(
        f"this model was made with surgery.from_module from a {kind}, which a recipe cannot rebuild (freezeray never "
        f"imports code named in a file): load it with surgery.load(uri, base=<a new {kind.rsplit('.', 1)[-1]}>)"
    )
