"""Graph edits behind ``TransferLearning``: each one takes a graph and an op (as data)
and edits the graph *in place* (hence the ``_`` suffix); the builder deep-copies the
input model once and calls these on the copy, then :func:`finish_` eliminates dead code,
sorts, lints and recompiles.

Widths are not computed here: a layer that needs a new input width is replaced by a
:class:`~surgery.graph.Pending` module, and shape propagation at the end of the build
creates it from the width that actually arrives (DL4J's ``nIn`` inference).
"""

from __future__ import annotations

import copy
import keyword
import logging
import re
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from . import layers as L
from .graph import (
    Pending,
    VertexError,
    cut_list,
    output_node,
    resolve,
    single_output,
    topo_sort_,
    users_closure,
    vertex_outputs,
    vertex_table,
)

__all__ = [
    "remove_keep_connections_",
    "remove_and_connections_",
    "n_out_replace_",
    "n_in_replace_",
    "add_module_",
    "set_outputs_",
    "finish_",
    "check_name",
    "is_parametric",
]

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
HOLE_KEY = "freezeray_hole"


def _removed(*inputs: Any) -> Any:
    """Stands for a vertex removed with ``remove_vertex_keep_connections`` until a new
    layer takes its name; running it means nothing did."""
    raise RuntimeError("a vertex removed with remove_vertex_keep_connections was never replaced")


torch.fx.wrap("_removed")


def check_name(gm: fx.GraphModule, name: str, table: dict | None = None, allow_hole: bool = True) -> None:
    """A new vertex name must be a plain identifier that names nothing in the graph yet."""
    plain = isinstance(name, str) and ((_NAME.match(name) and not keyword.iskeyword(name)) or name.isdigit())
    if not plain:
        raise VertexError(f"vertex name {name!r} is not valid: use letters, digits and '_' (no dots), not starting with "
                          "a digit, or only digits (as nn.Sequential names its children)")
    if allow_hole and _hole(gm, name) is not None:
        return
    table = table if table is not None else vertex_table(gm)
    if name in table:
        raise VertexError(f"vertex {name!r} already exists; remove it first (remove_vertex_keep_connections) or pick another name")
    if hasattr(gm, name):
        raise VertexError(f"vertex name {name!r} is taken by the GraphModule itself; pick another name")


def _hole(gm: fx.GraphModule, name: str) -> fx.Node | None:
    for n in gm.graph.nodes:
        if n.meta.get(HOLE_KEY) == name:
            return n
    return None


def holes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if HOLE_KEY in n.meta]


def _output_list(gm: fx.GraphModule) -> tuple[list[fx.Node], bool]:
    out = output_node(gm).args[0]
    if isinstance(out, fx.Node):
        return [out], False
    if isinstance(out, (tuple, list)) and all(isinstance(o, fx.Node) for o in out):
        return list(out), True
    raise VertexError("graph outputs that are not a tensor or a tuple of tensors are not supported by surgery")


def _set_output_list(gm: fx.GraphModule, nodes: list[fx.Node], as_tuple: bool) -> None:
    out = output_node(gm)
    out.args = ((tuple(nodes) if (as_tuple or len(nodes) != 1) else nodes[0]),)


def _erase_(gm: fx.GraphModule, nodes: set[fx.Node]) -> None:
    """Erase ``nodes``, and the modules no other node calls any more (so their names are
    free for new vertices). This is done in place."""
    targets = {str(n.target) for n in nodes if n.op == "call_module"}
    for n in reversed(list(gm.graph.nodes)):
        if n in nodes:
            gm.graph.erase_node(n)
    still = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    for target in sorted(targets - still, key=len, reverse=True):
        if "." not in target:  # a top-level module; nested ones go with delete_all_unused_submodules
            gm.delete_submodule(target)


# ---------------------------------------------------------------------------------------
# removal


def remove_keep_connections_(gm: fx.GraphModule, vertex: str) -> None:
    """Remove ``vertex`` but keep its connections: its consumers (and its place among
    the outputs) wait for a new vertex of the same name, which gets the removed vertex's
    inputs unless it names its own. This is done in place."""
    table = vertex_table(gm)
    v = resolve(gm, vertex, table)
    if v.kind == "input":
        raise VertexError(f"vertex {vertex!r} is the graph's input and cannot be removed")
    outs = vertex_outputs(gm, v)
    if len(outs) != 1:
        raise VertexError(f"vertex {vertex!r} produces {len(outs)} values; remove_vertex_keep_connections needs one")
    members = set(v.nodes)
    inputs: list[fx.Node] = []
    for n in v.nodes:
        for a in n.all_input_nodes:
            if a not in members and a not in inputs:
                inputs.append(a)
    with gm.graph.inserting_before(v.nodes[0]):
        hole = gm.graph.call_function(_removed, tuple(inputs))
    hole.meta[HOLE_KEY] = vertex
    outs[0].replace_all_uses_with(hole)
    _erase_(gm, members)


def remove_and_connections_(gm: fx.GraphModule, vertex: str) -> list[str]:
    """Remove ``vertex`` and everything computed from it (those vertices cannot run
    without it), and drop it from the outputs. This is done in place. Returns the names
    of the other nodes removed."""
    table = vertex_table(gm)
    v = resolve(gm, vertex, table)
    if v.kind == "input":
        raise VertexError(f"vertex {vertex!r} is the graph's input and cannot be removed")
    doomed = users_closure(v.nodes)
    outputs, as_tuple = _output_list(gm)
    _set_output_list(gm, [o for o in outputs if o not in doomed], as_tuple)
    also = [n.name for n in gm.graph.nodes if n in doomed and n not in set(v.nodes)]
    if also:
        log.info("removing vertex %r also removes what it fed: %s", vertex, cut_list(also))
    _erase_(gm, doomed)
    return also


# ---------------------------------------------------------------------------------------
# widths


def is_parametric(module: nn.Module) -> bool:
    """A layer whose weights depend on its input and output widths."""
    return isinstance(module, (L.Layer, nn.Linear, nn.modules.conv._ConvNd)) and not isinstance(module, Pending)


def _is_depthwise(module: nn.Module) -> bool:
    return (isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1
            and module.groups == module.in_channels == module.out_channels)


def _is_channelwise(module: nn.Module) -> bool:
    """Modules whose width must follow the channels they receive."""
    return isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)) or _is_depthwise(module)


def _fresh_linear_or_conv(module: nn.Module, n_in: int, n_out: int, init: Any, generator: torch.Generator | None,
                          groups: int | None = None) -> nn.Module:
    """A copy of ``module`` (any Linear/Conv subclass, e.g. timm's Conv2dSame) with new
    widths and freshly initialised weights."""
    new: Any = copy.deepcopy(module)
    if isinstance(new, nn.Linear):
        new.in_features, new.out_features = n_in, n_out
        shape: tuple[int, ...] = (n_out, n_in)
    else:
        g = groups if groups is not None else new.groups
        if n_in % g or n_out % g:
            raise VertexError(f"a convolution with groups={g} cannot have {n_in} inputs and {n_out} outputs")
        new.in_channels, new.out_channels, new.groups = n_in, n_out, g
        shape = (n_out, n_in // g, *new.kernel_size)
        if getattr(new, "transposed", False):
            shape = (n_in, n_out // g, *new.kernel_size)
    new.weight = nn.Parameter(torch.empty(shape))
    L.init_weight_(new.weight, init, generator)
    if new.bias is not None:
        new.bias = nn.Parameter(torch.zeros(n_out))
    return new


def _width_in(module: nn.Module) -> int:
    if isinstance(module, L.Layer):
        return int(module.n_in) if module.n_in is not None else -1
    m: Any = module
    return int(m.in_features if isinstance(m, nn.Linear) else m.in_channels)


def _with_widths(module: nn.Module, n_in: int | None, n_out: int | None, init: Any, seed: int | None,
                 name: str) -> nn.Module:
    """``module`` rebuilt with fresh weights, a new output width (``n_out``, None keeps
    it) and an input width that is kept (None), given, or open (-1: shape propagation
    decides)."""
    if isinstance(module, L.Layer):
        spec = module.spec() | ({"n_out": n_out} if n_out is not None else {})
        if init is not None:
            spec["weight_init"] = init
        layer = type(module)(**spec)
        layer.init_seed, layer.init_name = _init_seed(seed), name
        width = module.n_in if n_in is None else (None if n_in == -1 else n_in)
        if width is not None:
            layer.materialize(width)
        return layer
    m: Any = module
    out_w = n_out if n_out is not None else int(m.out_features if isinstance(m, nn.Linear) else m.out_channels)
    if n_in == -1:  # open: wait for the width shape propagation finds
        return _Rebuild(module, out_w, init, seed, name)
    generator = L.layer_generator(seed, name) if seed is not None else None
    return _fresh_linear_or_conv(module, n_in if n_in is not None else _width_in(module), out_w, init, generator)


class _Rebuild(Pending):
    """A Linear/Conv layer (any subclass, e.g. timm's Conv2dSame) waiting for shape
    propagation to find its input width, then rebuilt with fresh weights: what an
    ``n_out_replace`` of a producer leaves. Later edits of the same layer update it
    (its own ``n_out_replace`` changes the output width and init, ``n_in_replace`` fixes
    the input width), so edits of neighbouring layers compose."""

    def __init__(self, base: nn.Module, n_out: int, init: Any, seed: int | None, name: str) -> None:
        super().__init__(self._make, f"{type(base).__name__} {name!r}")
        object.__setattr__(self, "base", base)  # not a submodule: it is replaced, never run
        self.base: nn.Module
        self.n_out, self.init, self.seed, self.name = int(n_out), init, seed, name

    def with_n_out(self, n_out: int, init: Any) -> "_Rebuild":
        return _Rebuild(self.base, n_out, init, self.seed, self.name)

    def with_n_in(self, n_in: int, init: Any) -> nn.Module:
        return _fresh_linear_or_conv(self.base, n_in, self.n_out, init, self._generator())

    def _generator(self) -> torch.Generator | None:
        return L.layer_generator(self.seed, self.name) if self.seed is not None else None

    def _make(self, x: torch.Tensor) -> nn.Module:
        return _fresh_linear_or_conv(self.base, int(x.shape[1]), self.n_out, self.init, self._generator())


class _ChannelPending(Pending):
    """A channel-wise module (BatchNorm, GroupNorm, LayerNorm, depthwise convolution)
    waiting for the width that arrives; widths pass through it."""


def _init_seed(seed: int | None) -> int:
    # without a configured seed, draw one from torch's global RNG (in the builder's fixed op order)
    return int(seed) if seed is not None else int(torch.randint(0, 2**62, (1,), device="cpu").item())


def _channelwise_pending(module: Any, name: str) -> Pending:
    def build(x: torch.Tensor) -> nn.Module:
        new: Any = copy.deepcopy(module)
        if _is_depthwise(new):
            c = int(x.shape[1])
            return _fresh_linear_or_conv(new, c, c * (module.out_channels // module.in_channels), "default", None, groups=c)
        if isinstance(new, nn.LayerNorm):
            c = int(x.shape[-1])
            new.normalized_shape = (*new.normalized_shape[:-1], c)
        else:
            c = int(x.shape[1])
        if isinstance(new, nn.GroupNorm):
            if c % new.num_groups:
                raise VertexError(f"GroupNorm {name!r} has {new.num_groups} groups, which do not divide {c} channels")
            new.num_channels = c
        elif isinstance(new, nn.modules.batchnorm._NormBase):
            new.num_features = c
        shape = tuple(new.normalized_shape) if isinstance(new, nn.LayerNorm) else (c,)
        if getattr(new, "weight", None) is not None:
            new.weight = nn.Parameter(torch.ones(shape))
        if getattr(new, "bias", None) is not None:
            new.bias = nn.Parameter(torch.zeros(shape))
        if getattr(new, "running_mean", None) is not None:
            new.running_mean = torch.zeros(c)
            new.running_var = torch.ones(c)
            new.num_batches_tracked = torch.tensor(0, dtype=torch.long)
        return new

    return _ChannelPending(build, f"{type(module).__name__} {name!r}")


def _layer_node(gm: fx.GraphModule, vertex: str, op: str) -> tuple[fx.Node, nn.Module]:
    v = resolve(gm, vertex)
    if v.kind != "layer" or len(v.nodes) != 1:
        kinds = {"container": f"a container of {len(v.nodes)} nodes", "op": "a function", "input": "the input"}
        what = kinds.get(v.kind, "a layer called more than once")
        raise VertexError(f"{op} needs a layer with weights (Linear, Conv, Dense, Output, Convolution); {vertex!r} is {what}")
    node = v.nodes[0]
    module = gm.get_submodule(str(node.target))
    if not (is_parametric(module) or isinstance(module, _Rebuild)):  # _Rebuild: a producer's edit opened its width
        raise VertexError(f"{op} needs a layer with weights (Linear, Conv, Dense, Output, Convolution); "
                          f"{vertex!r} is a {type(module).__name__}")
    return node, module


def n_out_replace_(gm: fx.GraphModule, vertex: str, n_out: int, weight_init: Any, fan_out_init: Any,
                   seed: int | None) -> list[str]:
    """Give ``vertex`` ``n_out`` outputs and carry the new width forward. This is done in place.

    The width passes through shape-preserving vertices (activations, dropout, pooling,
    flatten, reshapes, element-wise ops), channel-wise ones are rebuilt for it
    (BatchNorm, GroupNorm, LayerNorm, depthwise convolutions), and every parametric
    layer it reaches gets an input width inferred by shape propagation and fresh weights
    initialised with ``fan_out_init``. It stops at the place of a vertex removed with
    ``remove_vertex_keep_connections`` (the vertex that takes it decides its own width).
    ``vertex`` may itself be waiting for its input width (an earlier ``n_out_replace`` of
    its producer): it keeps waiting, with the new output width. Returns the names of the
    rebuilt consumers.
    """
    if not isinstance(n_out, int) or isinstance(n_out, bool) or n_out <= 0:
        raise ValueError(f"n_out_replace({vertex!r}): n_out must be a positive integer, got {n_out!r}")
    node, module = _layer_node(gm, vertex, "n_out_replace")
    base = module.base if isinstance(module, _Rebuild) else module
    if isinstance(base, nn.modules.conv._ConvNd) and base.groups > 1:
        raise VertexError(f"n_out_replace({vertex!r}): grouped convolutions (groups={base.groups}) cannot change width")
    new: nn.Module
    if isinstance(module, _Rebuild):
        new = module.with_n_out(n_out, weight_init)
    else:
        new = _with_widths(module, None, n_out, weight_init, seed, vertex)
    gm.set_submodule(str(node.target), new)
    rebuilt: list[str] = []
    seen: set[fx.Node] = set()
    frontier = list(node.users)
    while frontier:
        u = frontier.pop(0)
        if u in seen or u.op == "output" or HOLE_KEY in u.meta:
            continue
        seen.add(u)
        if u.op == "call_module":
            m = gm.get_submodule(str(u.target))
            if isinstance(m, _Rebuild):  # already waiting for its input width (another producer's edit)
                rebuilt.append(str(u.target))
                continue
            if is_parametric(m) and not _is_depthwise(m):
                gm.set_submodule(str(u.target), _with_widths(m, -1, None, fan_out_init, seed, str(u.target)))
                rebuilt.append(str(u.target))
                continue
            if _is_channelwise(m):
                gm.set_submodule(str(u.target), _channelwise_pending(m, str(u.target)))
                rebuilt.append(str(u.target))
        frontier.extend(u.users)
    return rebuilt


def n_in_replace_(gm: fx.GraphModule, vertex: str, n_in: int, weight_init: Any, seed: int | None) -> None:
    """Give ``vertex`` ``n_in`` inputs and fresh weights (DL4J's ``nInReplace``), also when
    an ``n_out_replace`` of its producer left its input width open. The build fails with
    a shape error if its input does not have that width. This is done in place."""
    if not isinstance(n_in, int) or isinstance(n_in, bool) or n_in <= 0:
        raise ValueError(f"n_in_replace({vertex!r}): n_in must be a positive integer, got {n_in!r}")
    node, module = _layer_node(gm, vertex, "n_in_replace")
    if isinstance(module, _Rebuild):
        new = module.with_n_in(n_in, weight_init)
    else:
        new = _with_widths(module, n_in, None, weight_init, seed, vertex)
    gm.set_submodule(str(node.target), new)


# ---------------------------------------------------------------------------------------
# additions and outputs


def add_module_(gm: fx.GraphModule, name: str, module: nn.Module, inputs: list[str], merge: bool,
                seed: int | None) -> None:
    """Add ``module`` as vertex ``name`` fed by ``inputs``. This is done in place.

    ``merge``: several inputs are concatenated along dim 1 by a ``Merge`` vertex named
    ``<name>_merge`` (DL4J adds a MergeVertex the same way); otherwise they are passed
    as separate arguments. A name freed by ``remove_vertex_keep_connections`` takes the
    removed vertex's place, and its inputs when none are given.
    """
    from .vertices import Merge

    table = vertex_table(gm)
    check_name(gm, name, table)
    hole = _hole(gm, name)
    if hole is None and not inputs:
        raise VertexError(f"add {name!r}: name at least one input vertex")
    if inputs:
        input_nodes = [_input_node(gm, i, table) for i in inputs]
    else:
        input_nodes = list(hole.args)  # type: ignore[union-attr, arg-type]
    if isinstance(module, L.Layer):
        module.init_seed, module.init_name = _init_seed(seed), name
    anchor = output_node(gm)
    if merge and len(input_nodes) > 1:
        merge_name = f"{name}_merge"
        check_name(gm, merge_name, table, allow_hole=False)
        gm.add_submodule(merge_name, Merge(dim=1))
        with gm.graph.inserting_before(anchor):
            merged = gm.graph.call_module(merge_name, tuple(input_nodes))
        input_nodes = [merged]
    gm.add_submodule(name, module)
    with gm.graph.inserting_before(anchor):
        node = gm.graph.call_module(name, tuple(input_nodes))
    if hole is not None:
        hole.replace_all_uses_with(node)
        gm.graph.erase_node(hole)


def _input_node(gm: fx.GraphModule, name: str, table: dict) -> fx.Node:
    hole = _hole(gm, name)
    if hole is not None:
        raise VertexError(f"input {name!r} was removed with remove_vertex_keep_connections and not replaced yet")
    return single_output(gm, name, table)


def set_outputs_(gm: fx.GraphModule, vertices: list[str]) -> None:
    """Make ``vertices`` the graph's outputs, in this order. This is done in place."""
    if not vertices:
        raise VertexError("set_outputs needs at least one vertex")
    table = vertex_table(gm)
    nodes = [_input_node(gm, v, table) for v in vertices]
    _set_output_list(gm, nodes, as_tuple=len(nodes) > 1)


def finish_(gm: fx.GraphModule) -> None:
    """Dead-code elimination, a stable topological sort, ``lint`` and ``recompile``.
    This is done in place.

    Raises:
        VertexError: a vertex removed with keep-connections that nothing replaced, or a
            graph without outputs.
    """
    outputs, _ = _output_list(gm)
    if not outputs:
        raise VertexError("the graph has no outputs left; call set_outputs(...) with the vertices to output")
    topo_sort_(gm.graph)  # edits append nodes before the output; DCE needs graph order
    gm.graph.eliminate_dead_code()
    left = [h for h in holes(gm)]
    if left:
        names = ", ".join(repr(h.meta[HOLE_KEY]) for h in left)
        users = cut_list(sorted({u.name for h in left for u in h.users}))
        raise VertexError(
            f"vertex {names} was removed with remove_vertex_keep_connections and nothing took its place, but "
            f"{users} still need it; add a layer with that name, or use remove_vertex_and_connections"
        )
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
