"""Model graphs: tracing to ``torch.fx``, naming vertices, and propagating shapes.

A freezeray model is a ``torch.fx.GraphModule``. Its vertices (DL4J's word; FX says
nodes) have one naming scheme, listed by :func:`vertex_names`:

* a module vertex is addressed by its qualified module name (``"fc2"``, ``"layer4"``,
  ``"classifier.6"``, ``"blocks.3"``). Containers such as ``"layer4"`` stand for every
  node inside them; a leaf module called more than once also lends its node names
  (``"relu_1"``) to address one call;
* every other vertex (inputs, functions, methods) by its FX node name (``"x"``,
  ``"add_3"``, ``"flatten"``).

Everything that takes a vertex accepts exactly these names.
"""

from __future__ import annotations

import difflib
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal, Sequence

import torch
import torch.fx as fx
from torch import nn

from freezeray.errors import InvalidInput

__all__ = [
    "VertexError",
    "ShapeError",
    "Vertex",
    "Tracer",
    "trace",
    "vertex_names",
    "vertex_table",
    "resolve",
    "resolve_many",
    "vertex_of",
    "output_node",
    "output_vertices",
    "propagate_",
    "Pending",
    "node_shape",
]

log = logging.getLogger(__name__)

SHAPE_KEY = "freezeray_shape"


class VertexError(InvalidInput, ValueError):
    """A vertex name that is not in the graph, or one that cannot be used as asked.
    ``vertex`` names it (None when unknown); ``op`` is the surgery op being applied when it
    was raised (set by :func:`surgery.builder.apply_ops`), for ``freezeray check`` to name."""

    op: Any = None

    def __init__(self, message: str, vertex: str | None = None) -> None:
        super().__init__(message)
        self.vertex = vertex


class ShapeError(InvalidInput, ValueError):
    """Two connected vertices disagree about a tensor's shape. ``vertex`` names the
    vertex that could not take its input (None when unknown); ``op`` as for
    :class:`VertexError`."""

    op: Any = None

    def __init__(self, message: str, vertex: str | None = None) -> None:
        super().__init__(message)
        self.vertex = vertex


@dataclass(frozen=True)
class Vertex:
    """A named vertex: its member nodes in graph order and what kind of vertex it is."""

    name: str
    nodes: tuple[fx.Node, ...]
    kind: Literal["input", "layer", "op", "container"]


# ---------------------------------------------------------------------------------------
# tracing


def _leaf_types() -> tuple[type, ...]:
    from . import layers, vertices

    leaves: list[type] = [layers.Layer, vertices.GraphVertex]
    try:  # timm's modules that symbolic tracing cannot enter (same padding, fused norm+act)
        from timm.models._features_fx import get_notrace_modules

        leaves += list(get_notrace_modules())
    except ImportError:  # pragma: no cover - timm is a dependency, this guards its layout
        pass
    try:  # its forward reads self.training, which tracing would freeze to a constant
        from torchvision.ops import StochasticDepth

        leaves.append(StochasticDepth)
    except ImportError:  # pragma: no cover
        pass
    return tuple(leaves)


def _autowrap_functions() -> tuple:
    try:
        from timm.models._features_fx import get_notrace_functions

        return tuple(get_notrace_functions())
    except ImportError:  # pragma: no cover
        return ()


class Tracer(fx.Tracer):
    """``torch.fx`` tracer that keeps timm's no-trace modules, torchvision's
    ``StochasticDepth`` and freezeray's own layers and vertices as leaves."""

    def __init__(self) -> None:
        super().__init__(autowrap_functions=_autowrap_functions())
        self._leaves = _leaf_types()

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self._leaves):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace(module: nn.Module, name: str) -> fx.GraphModule:
    """Trace ``module`` into a ``GraphModule`` named ``name``.

    The module is traced in eval mode: functional code that reads ``self.training`` at
    trace time (timm's head dropout, for one) keeps its inference behaviour.
    """
    module.eval()
    tracer = Tracer()
    try:
        graph = tracer.trace(module)
    except Exception as exc:  # torch.fx raises many types; all mean "cannot trace"
        raise TypeError(
            f"cannot trace {name} ({type(module).__name__}) with torch.fx: {exc}. "
            "Hint: modules with data-dependent control flow need to be leaves; "
            "register them with timm.layers.register_notrace_module."
        ) from exc
    gm = fx.GraphModule(tracer.root, graph, name)
    gm.eval()
    return gm


# ---------------------------------------------------------------------------------------
# naming


def _owner(node: fx.Node) -> str:
    """Qualified name of the innermost module a node belongs to ("" for the top level)."""
    if node.op == "call_module":
        return str(node.target)
    if node.op == "get_attr":
        return str(node.target).rpartition(".")[0]
    stack = node.meta.get("nn_module_stack")
    if stack:
        return str(list(stack.values())[-1][0])
    return ""


def vertex_table(model: fx.GraphModule) -> dict[str, Vertex]:
    """Every vertex of ``model`` by name, in graph order (containers after their first node)."""
    nodes = [n for n in model.graph.nodes if n.op != "output"]
    calls = Counter(n.target for n in nodes if n.op == "call_module")
    leaves: dict[str, list[fx.Node]] = {}
    kinds: dict[str, str] = {}
    containers: dict[str, list[fx.Node]] = {}
    for n in nodes:
        if n.op == "call_module":
            leaves.setdefault(str(n.target), []).append(n)
            kinds[str(n.target)] = "layer"
            if calls[n.target] > 1:
                leaves[n.name] = [n]
                kinds[n.name] = "layer"
        else:
            leaves[n.name] = [n]
            kinds[n.name] = "input" if n.op == "placeholder" else "op"
        parts = _owner(n).split(".") if _owner(n) else []
        depth = len(parts) - 1 if n.op == "call_module" else len(parts)
        for i in range(1, depth + 1):
            containers.setdefault(".".join(parts[:i]), []).append(n)
    table = {name: Vertex(name, tuple(members), kinds[name]) for name, members in leaves.items()}  # type: ignore[arg-type]
    for name, members in containers.items():
        if name not in table:  # a leaf or node name wins over a container of the same name
            table[name] = Vertex(name, tuple(members), "container")
    return table


def vertex_names(model: fx.GraphModule) -> list[str]:
    """All vertex names of ``model``, in graph order (like torchvision's
    ``get_graph_node_names``).

    Example:
        >>> vertex_names(surgery.zoo.load("vgg16"))[:3]
        ['x', 'block1_conv1', 'block1_conv2']
    """
    return list(vertex_table(model))


def vertex_of(node: fx.Node, calls: Counter | None = None) -> str:
    """The vertex name that addresses exactly this node."""
    if node.op == "call_module":
        if calls is not None and calls[node.target] > 1:
            return node.name
        return str(node.target)
    return node.name


def output_node(model: fx.GraphModule) -> fx.Node:
    """The graph's ``output`` node (its inputs are the model's outputs, in order)."""
    return next(n for n in model.graph.nodes if n.op == "output")


def output_vertices(model: fx.GraphModule) -> list[str]:
    """The vertices the model outputs, in order, by the names that address them."""
    calls = Counter(n.target for n in model.graph.nodes if n.op == "call_module")
    return [vertex_of(n, calls) for n in output_node(model).all_input_nodes]


def _model_name(model: fx.GraphModule) -> str:
    from .recipe import get_info

    info = get_info(model, required=False)
    return info.name if info is not None else type(model).__name__


def cut_list(names: Sequence[str], limit: int = 20) -> str:
    """``a, b, c`` with at most ``limit`` names and a count of the rest."""
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def unknown_vertex(name: str, model: fx.GraphModule, table: dict[str, Vertex] | None = None) -> VertexError:
    names = list(table or vertex_table(model))
    close = difflib.get_close_matches(str(name), names, n=5, cutoff=0.6)
    where = f"the graph of {_model_name(model)}"
    hint = f"Closest: {', '.join(close)}." if close else f"Vertices: {cut_list(names)}."
    return VertexError(f"vertex {name!r} is not in {where}. {hint} Hint: surgery.summary(model) lists every vertex.",
                       name if isinstance(name, str) else None)


def resolve(model: fx.GraphModule, name: str, table: dict[str, Vertex] | None = None) -> Vertex:
    """The vertex called ``name``; a :class:`VertexError` naming close matches otherwise."""
    table = table if table is not None else vertex_table(model)
    if not isinstance(name, str) or name not in table:
        raise unknown_vertex(name, model, table)
    return table[name]


def resolve_many(model: fx.GraphModule, name: str, table: dict[str, Vertex] | None = None) -> list[Vertex]:
    """The vertex called ``name``, or every vertex inside the container ``name`` (a
    module path such as timm's ``blocks.6``, whose vertices are ``blocks.6.0.conv_pw``,
    ...); a :class:`VertexError` naming close matches otherwise."""
    table = table if table is not None else vertex_table(model)
    if isinstance(name, str) and name not in table:
        inside = [v for k, v in table.items() if k.startswith(name + ".")]
        if inside:
            return inside
    return [resolve(model, name, table)]


def vertex_outputs(model: fx.GraphModule, vertex: Vertex) -> list[fx.Node]:
    """Member nodes whose values leave the vertex (used outside it, or graph outputs)."""
    members = set(vertex.nodes)
    outs = [n for n in vertex.nodes if any(u not in members for u in n.users)]
    return outs or [vertex.nodes[-1]]


def single_output(model: fx.GraphModule, name: str, table: dict[str, Vertex] | None = None) -> fx.Node:
    """The one node whose value a vertex produces; an error if it has several."""
    vertex = resolve(model, name, table)
    outs = vertex_outputs(model, vertex)
    if len(outs) != 1:
        calls = Counter(n.target for n in model.graph.nodes if n.op == "call_module")
        raise VertexError(
            f"vertex {name!r} produces {len(outs)} values ({cut_list([vertex_of(n, calls) for n in outs])}); "
            "name one of them instead."
        )
    return outs[0]


# ---------------------------------------------------------------------------------------
# shapes


def _shape_of(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)):
        return tuple(_shape_of(v) for v in value)
    return None


def node_shape(node: fx.Node) -> Any:
    """The output shape recorded for ``node`` by the last :func:`propagate_` (or None)."""
    return node.meta.get(SHAPE_KEY)


def _expected(module: nn.Module) -> str:
    """What a module expects of its input, for error messages."""
    from . import layers

    if isinstance(module, layers.Layer):
        return module.expects()
    if isinstance(module, nn.Linear):
        return f"expects (*, {module.in_features})"
    if isinstance(module, nn.modules.conv._ConvNd):
        return f"expects (N, {module.in_channels}, ...)"
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return f"expects (N, {module.num_features}, ...)"
    if isinstance(module, nn.LayerNorm):
        return f"expects (..., {', '.join(map(str, module.normalized_shape))})"
    return ""


class Pending(nn.Module):
    """A module whose input width is decided by shape propagation: ``build(x)`` makes the
    real module for a first input ``x``. Only exists while a model is being built."""

    def __init__(self, build: Callable[[torch.Tensor], nn.Module], what: str) -> None:
        super().__init__()
        self.build = build
        self.what = what

    def forward(self, *args: Any) -> Any:
        raise RuntimeError(f"{self.what} was never given an input width; build the model first")


class _Propagator(fx.Interpreter):
    """Runs the graph once, materializing layers whose input width is still open."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self._calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")

    def run_node(self, n: fx.Node) -> Any:

        try:
            if n.op == "call_module":
                self._materialize(n)
            value = super().run_node(n)
        except Exception as exc:
            raise self._explain(n, exc) from exc
        n.meta[SHAPE_KEY] = _shape_of(value)
        return value

    def _materialize(self, n: fx.Node) -> None:
        from . import layers

        module = self.fetch_attr(str(n.target))
        first = self.env.get(n.args[0]) if n.args and isinstance(n.args[0], fx.Node) else None
        if isinstance(module, Pending):
            if not isinstance(first, torch.Tensor):
                raise ShapeError(f"cannot infer the input width of {n.target!r} from a non-tensor input")
            self.module.set_submodule(str(n.target), module.build(first))
        elif isinstance(module, layers.Layer) and not module.materialized:
            if not isinstance(first, torch.Tensor) or first.dim() < 2:
                raise ShapeError(f"cannot infer n_in of {n.target!r} from an input shaped {_shape_of(first)}")
            module.materialize(module.infer_n_in(first))

    def _explain(self, n: fx.Node, exc: Exception) -> ShapeError:
        inputs = [a for a in n.all_input_nodes]
        described = ", ".join(f"{vertex_of(a, self._calls)!r} shaped {node_shape(a)}" for a in inputs) or "no inputs"
        what = ""
        if n.op == "call_module":
            what = _expected(self.fetch_attr(str(n.target)))
            what = f" ({type(self.fetch_attr(str(n.target))).__name__}{', ' + what if what else ''})"
        return ShapeError(
            f"vertex {vertex_of(n, self._calls)!r}{what} cannot take its input from {described}: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
            vertex=vertex_of(n, self._calls),
        )


def example_input(input_size: Sequence[int], batch: int = 2) -> torch.Tensor:
    """A seeded random batch of the model's input size, for shape propagation."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, *input_size, generator=g)


def propagate_(model: fx.GraphModule, *inputs: torch.Tensor) -> Any:
    """Run ``model`` once in eval mode and record every node's output shape.

    Layers whose ``n_in`` is still unknown are materialized from the width of their
    input (this is DL4J's shape inference). This is done in place. Returns the output.

    Raises:
        ShapeError: naming the vertex that failed, its inputs and their shapes.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return _Propagator(model).run(*inputs)
    except ShapeError as exc:  # fx.Interpreter appends its own trace of the node to the message
        raise ShapeError(str(exc).splitlines()[0], exc.vertex) from exc.__cause__
    finally:
        model.train(was_training)


def topo_sort_(graph: fx.Graph) -> None:
    """Reorder nodes so every node comes after its inputs, keeping the existing order
    where it already holds (a stable Kahn sort). This is done in place."""
    nodes = list(graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    for n in nodes:
        if n.op == "output":  # the output node stays last whatever else is dead or alive
            index[n] = len(nodes) + 1
    pending = {n: len(set(n.all_input_nodes)) for n in nodes}
    import heapq

    ready = [(index[n], n.name) for n in nodes if pending[n] == 0]
    heapq.heapify(ready)
    by_name = {n.name: n for n in nodes}
    order: list[fx.Node] = []
    while ready:
        _, name = heapq.heappop(ready)
        n = by_name[name]
        order.append(n)
        for u in n.users:
            pending[u] -= 1
            if pending[u] == 0:
                heapq.heappush(ready, (index[u], u.name))
    if len(order) != len(nodes):
        stuck = [n.name for n in nodes if n not in set(order)]
        raise VertexError(f"the graph has a cycle through {cut_list(stuck)}")
    cursor = None
    for n in order:
        if cursor is not None:
            cursor.append(n)
        cursor = n


def users_closure(nodes: Iterable[fx.Node]) -> set[fx.Node]:
    """``nodes`` and everything computed from them (excluding the output node)."""
    seen: set[fx.Node] = set()
    stack = list(nodes)
    while stack:
        n = stack.pop()
        if n in seen or n.op == "output":
            continue
        seen.add(n)
        stack.extend(n.users)
    return seen


def ancestors_closure(nodes: Iterable[fx.Node]) -> set[fx.Node]:
    """``nodes`` and everything they are computed from."""
    seen: set[fx.Node] = set()
    stack = list(nodes)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen
