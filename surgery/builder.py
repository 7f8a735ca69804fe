"""``TransferLearning``: DL4J's ``TransferLearning.GraphBuilder`` for ``torch.fx`` graphs.

The builder records ops as data; ``build()`` applies them to a deep copy of the input
model in a fixed order, so the result does not depend on the order of the calls:

1. removals (``remove_vertex_keep_connections`` first, then ``remove_vertex_and_connections``);
2. width changes (``n_out_replace``, ``n_in_replace``) in graph order;
3. additions (``add_layer``, ``add_vertex``) in dependency order, ties by name;
4. ``set_outputs``;
5. shape propagation (``n_in`` inference; shape errors are raised here);
6. freezing (``set_feature_extractor``, ``freeze``, ``unfreeze``) and the fine-tune configuration.

Edits of neighbouring vertices compose, as DL4J's do (:mod:`surgery.compose`): removing a
vertex an earlier removal already took (with what it was computed from) does nothing more,
a width edit of a layer whose input width a producer's ``n_out_replace`` opened updates
it, and a removal called twice is one removal; edits that truly conflict raise an error
naming both.

Calling ``set_feature_extractor`` more than once freezes the union of what was named.
New weights are drawn from a generator per (seed, vertex name) when the fine-tune
configuration has a seed, so they too do not depend on the call order.
"""

from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch.fx as fx
from torch import nn

from . import edits as E
from . import layers as L
from . import ops
from .compose import EditRun, describe_op
from .freeze import apply_frozen_, feature_extractor_nodes, frozen_nodes
from .graph import (
    ShapeError,
    VertexError,
    example_input,
    output_node,
    output_vertices,
    propagate_,
    resolve,
    vertex_of,
    vertex_table,
)
from .recipe import get_info, set_info_
from .specs import describe
from .training.config import FineTuneConfiguration

__all__ = ["TransferLearning", "apply_ops", "apply_dropout_defaults"]

log = logging.getLogger(__name__)

_SINGLE = ("set_outputs", "fine_tune_configuration")
_IDEMPOTENT = ("remove_vertex_keep_connections", "remove_vertex_and_connections")


class TransferLearning:
    """Edit a pretrained graph: replace layers, change widths, add and remove vertices,
    freeze a feature extractor, set a fine-tune configuration.

    Every method returns the builder; ``build()`` returns a new model and leaves the
    input model untouched.

    Example:
        >>> model = (TransferLearning(vgg16)
        ...          .fine_tune_configuration(FineTuneConfiguration(updater="nesterov", lr=5e-5, seed=123))
        ...          .set_feature_extractor("fc2")
        ...          .remove_vertex_keep_connections("predictions")
        ...          .add_layer("predictions", Output(5, loss="nll"), "fc2")
        ...          .build())
    """

    def __init__(self, model: fx.GraphModule) -> None:
        get_info(model)  # a freezeray model, or a clear error
        self._model = model
        self._ops: list[E.Op] = []
        self._modules: dict[str, nn.Module] = {}  # live modules for add_layer/add_vertex, by vertex name
        self._chain: list[str] | None = None  # the input model's layers, when addressed by index
        self._removed_from_output = 0  # layers remove_layers_from_output/remove_output_layer took

    # -- recording ------------------------------------------------------------------------
    def _record(self, op: E.Op) -> "TransferLearning":
        kind = op.op
        if kind in _SINGLE and any(o.op == kind for o in self._ops):
            raise ValueError(f"{kind} was already called on this builder; call it once")
        key = _key(op)
        if key is not None:
            for o in self._ops:
                if _key(o) == key and o.op == kind:
                    if kind in _IDEMPOTENT:  # DL4J users repeat removals; removing a vertex twice is removing it
                        return self
                    raise ValueError(f"{kind}({key!r}) was already called on this builder: {describe_op(o)} and "
                                     f"{describe_op(op)} conflict; call it once")
        self._ops.append(op)
        return self

    def fine_tune_configuration(self, config: FineTuneConfiguration) -> "TransferLearning":
        """Train the trainable part with ``config`` (layers' own settings win). On a model
        that already has a configuration, only the settings given in ``config`` override
        it (DL4J's semantics); the others keep the model's values."""
        if not isinstance(config, FineTuneConfiguration):
            raise TypeError(f"fine_tune_configuration takes a FineTuneConfiguration, got {type(config).__name__}")
        return self._record(E.FineTuneOp(config=config))

    def set_feature_extractor(self, *vertices: str | int) -> "TransferLearning":
        """Freeze ``vertices`` and all their ancestors; the frozen set becomes exactly that
        (so this can also unfreeze). On a chain, ``set_feature_extractor(3)`` freezes layers
        0-3 (DL4J's ``TransferLearning.Builder.setFeatureExtractor(3)``)."""
        if not vertices:
            raise ValueError("set_feature_extractor needs at least one vertex")
        vertices = tuple(self._v(v) for v in vertices)
        for i, o in enumerate(self._ops):
            if isinstance(o, E.SetFeatureExtractor):
                self._ops[i] = E.SetFeatureExtractor(vertices=sorted(set(o.vertices) | set(vertices)))
                return self
        return self._record(E.SetFeatureExtractor(vertices=sorted(set(vertices))))

    def freeze(self, *vertices: str | int) -> "TransferLearning":
        """Freeze just these vertices (not their ancestors), on top of the frozen set."""
        return self._record(E.Freeze(vertices=sorted({self._v(v) for v in vertices})))

    def unfreeze(self, *vertices: str | int) -> "TransferLearning":
        """Unfreeze these vertices; applied after every freezing op."""
        return self._record(E.Unfreeze(vertices=sorted({self._v(v) for v in vertices})))

    def n_out_replace(self, vertex: str | int, n_out: int, weight_init: Any = "xavier",
                      fan_out_init: Any = None) -> "TransferLearning":
        """Give ``vertex`` ``n_out`` outputs (weights re-initialised with ``weight_init``)
        and carry the width forward to the next parametric layers, which are rebuilt with
        ``fan_out_init`` (default: ``weight_init``)."""
        return self._record(E.NOutReplace(vertex=self._v(vertex), n_out=n_out, weight_init=weight_init,
                                          fan_out_init=fan_out_init if fan_out_init is not None else weight_init))

    def n_in_replace(self, vertex: str | int, n_in: int, weight_init: Any = "xavier") -> "TransferLearning":
        """Give ``vertex`` ``n_in`` inputs and fresh weights."""
        return self._record(E.NInReplace(vertex=self._v(vertex), n_in=n_in, weight_init=weight_init))

    def remove_vertex_keep_connections(self, vertex: str | int) -> "TransferLearning":
        """Remove ``vertex`` but keep its place: a vertex added later under the same name
        takes its place among its consumers and the outputs, and its inputs unless it
        names its own. ``build()`` fails if nothing takes the place of a vertex that
        something still reads."""
        return self._record(E.RemoveVertexKeepConnections(vertex=self._v(vertex)))

    def remove_vertex_and_connections(self, vertex: str | int) -> "TransferLearning":
        """Remove ``vertex`` and every vertex computed from it, directly or not (each of
        them needs its output), and drop all of those from the model's outputs. Vertices
        that only fed ``vertex`` stay (dead ones are removed at the end of ``build()``, as
        always). Example: on VGG16, ``remove_vertex_and_connections("fc2")`` removes
        ``fc2`` and ``predictions``; ``fc1`` stays, and the model has no output until
        ``add_layer``/``set_outputs`` give it one."""
        return self._record(E.RemoveVertexAndConnections(vertex=self._v(vertex)))

    def remove_output_layer(self) -> "TransferLearning":
        """DL4J's ``removeOutputLayer()`` on a chain: remove its last layer (and what follows
        it); ``add_layer(layer)`` then appends a new one."""
        return self.remove_layers_from_output(1)

    def remove_layers_from_output(self, n: int) -> "TransferLearning":
        """DL4J's ``removeLayersFromOutput(n)`` on a chain: remove its last ``n`` layers (of
        those earlier calls left, as DL4J counts: two ``remove_output_layer()`` remove two)."""
        chain = self._layers()
        left = len(chain) - self._removed_from_output
        if not isinstance(n, int) or isinstance(n, bool) or not 0 < n <= left:
            raise ValueError(f"remove_layers_from_output takes 1..{left} (the chain's layers left), got {n!r}")
        self._removed_from_output += n
        return self._record(E.RemoveVertexAndConnections(vertex=chain[left - n]))

    def add_layer(self, name: str | nn.Module, layer: nn.Module | None = None, *inputs: str | int) -> "TransferLearning":
        """Add ``layer`` as vertex ``name`` after ``inputs`` (several inputs are concatenated
        along dim 1 first, like DL4J's automatic MergeVertex). ``n_in`` is inferred.

        On a chain, ``add_layer(layer)`` (DL4J's ``TransferLearning.Builder.addLayer``)
        appends ``layer`` after the last layer left once removals are done, in call order;
        it is named by its index (``"7"``), as ``nn.Sequential`` names its children."""
        if isinstance(name, nn.Module) and layer is None and not inputs:
            chain = self._layers()
            appended = sum(1 for o in self._ops if isinstance(o, E.AddLayer) and o.append)
            index = len(chain) - self._removed_from_output + appended
            return self._add("add_layer", str(index), name, (), append=True)
        if layer is None:
            raise TypeError("add_layer takes (name, layer, *inputs), or (layer) to append to a chain")
        return self._add("add_layer", str(name), layer, tuple(self._v(i) for i in inputs))

    def add_vertex(self, name: str, vertex: nn.Module, *inputs: str | int) -> "TransferLearning":
        """Add a vertex (``surgery.vertices.Merge``, ``ElementWise``, ``Subset``, ... or any
        module) that takes ``inputs`` as separate arguments."""
        return self._add("add_vertex", name, vertex, tuple(self._v(i) for i in inputs))

    def _add(self, kind: str, name: str, module: nn.Module, inputs: tuple[str, ...],
             append: bool = False) -> "TransferLearning":
        if not isinstance(module, nn.Module):
            raise TypeError(f"{kind}({name!r}): expected a torch.nn.Module, got {type(module).__name__}")
        spec = describe(module)
        layer_class = None if spec is not None else f"{type(module).__module__}.{type(module).__qualname__}"
        if kind == "add_layer":
            op: E.Op = E.AddLayer(name=name, layer=spec, inputs=list(inputs), layer_class=layer_class, append=append)
        else:
            op = E.AddVertex(name=name, vertex=spec, inputs=list(inputs), layer_class=layer_class)
        self._record(op)
        self._modules[name] = module
        return self

    def set_outputs(self, *vertices: str | int) -> "TransferLearning":
        """Make ``vertices`` the model's outputs, in this order."""
        return self._record(E.SetOutputs(vertices=[self._v(v) for v in vertices]))

    # -- layer indices (DL4J's TransferLearning.Builder, for chains) ----------------------
    def _layers(self) -> list[str]:
        if self._chain is None:
            self._chain = layer_chain(self._model)
        return self._chain

    def _v(self, vertex: str | int) -> str:
        """A vertex name, or a layer index resolved on the input model's chain."""
        if isinstance(vertex, bool) or not isinstance(vertex, (str, int)):
            raise TypeError(f"a vertex is a name or (on a chain) a layer index, got {vertex!r}")
        if isinstance(vertex, str):
            return vertex
        chain = self._layers()
        if not -len(chain) <= vertex < len(chain):
            raise VertexError(f"layer index {vertex} is out of range: the chain has {len(chain)} layers "
                              f"(0-{len(chain) - 1}); surgery.summary(model) numbers them")
        return chain[vertex]

    def extend(self, ops: list[Any]) -> "TransferLearning":
        """Record ops given as data: :mod:`surgery.edits` objects, recipe dicts, or a
        config's short form (``{"n_out_replace": {"vertex": "fc2", "n_out": 1024}}``).
        Added layers are built from their specs."""
        for op in E.parse_ops(list(ops)):
            if isinstance(op, E.SetFeatureExtractor):
                self.set_feature_extractor(*op.vertices)
            else:
                self._record(op)
        return self

    @property
    def ops(self) -> list[E.Op]:
        """The ops recorded so far, in call order."""
        return list(self._ops)

    # -- building -------------------------------------------------------------------------
    def build(self) -> fx.GraphModule:
        """A new model with every recorded op applied; the input model is unchanged.

        Raises:
            VertexError: an unknown vertex (naming close matches) or an impossible edit.
            ShapeError: widths that do not fit, naming both vertices and both shapes.
        """
        model = copy.deepcopy(self._model)
        modules = {name: copy.deepcopy(m) for name, m in self._modules.items()}
        return apply_ops(model, self._ops, modules)


def layer_chain(model: fx.GraphModule) -> list[str]:
    """The layers of a chain model, in order: its module vertices (DL4J's layers of a
    ``MultiLayerNetwork``; functions between them, such as ``F.relu``, are not layers).

    Raises:
        VertexError: the graph is not a chain (a vertex with two inputs or two users).
    """
    from collections import Counter

    nodes = [n for n in model.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    calls = Counter(n.target for n in nodes if n.op == "call_module")
    for n in nodes:
        inputs = [a for a in n.all_input_nodes if a.op != "get_attr"]
        if len(inputs) != 1 or len(n.users) > 1:
            raise VertexError(
                f"{get_info(model).name} is not a chain (vertex {vertex_of(n, calls)!r} has {len(inputs)} inputs and "
                f"{len(n.users)} users), so its layers have no index; use vertex names (surgery.vertex_names(model))")
    return [vertex_of(n, calls) for n in nodes if n.op == "call_module"]


def _key(op: E.Op) -> str | None:
    return getattr(op, "vertex", None) if isinstance(getattr(op, "vertex", None), str) else getattr(op, "name", None)


def _canonical(model: fx.GraphModule, ops_: list[E.Op]) -> list[E.Op]:
    """The ops in the order ``build()`` applies them (see the module docstring)."""
    position = {n.name: i for i, n in enumerate(model.graph.nodes)}
    table = vertex_table(model)

    def graph_pos(vertex: str) -> int:
        v = table.get(vertex)
        return position[v.nodes[0].name] if v is not None else len(position)

    appends = [o for o in ops_ if isinstance(o, E.AddLayer) and o.append]  # last, in call order
    adds = [o for o in ops_ if isinstance(o, (E.AddLayer, E.AddVertex)) and o not in appends]
    added = {o.name for o in adds}
    ordered_adds: list[E.Op] = []
    done: set[str] = set()
    remaining = sorted(adds, key=lambda o: o.name)
    while remaining:
        ready = [o for o in remaining if all(i not in added or i in done for i in o.inputs)]
        if not ready:
            raise VertexError(f"added vertices depend on each other in a cycle: {', '.join(o.name for o in remaining)}")
        first = ready[0]
        ordered_adds.append(first)
        done.add(first.name)
        remaining.remove(first)
    rest = [o for o in ops_ if not isinstance(o, (E.AddLayer, E.AddVertex))]
    rest.sort(key=lambda o: (o.phase, graph_pos(getattr(o, "vertex")) if isinstance(getattr(o, "vertex", None), str) else 0,
                             o.op))
    before = [o for o in rest if o.phase < 3]
    after = [o for o in rest if o.phase > 3]
    return before + ordered_adds + appends + after


def apply_ops(model: fx.GraphModule, ops_: Sequence[E.Op | dict[str, Any]],
              modules: dict[str, nn.Module] | None = None) -> fx.GraphModule:
    """Apply builder ops (:mod:`surgery.edits` objects, or their dicts from a recipe) to
    ``model`` in canonical order. This is done in place on ``model`` (the builder passes a
    deep copy); ``surgery.load`` uses it to replay a recipe. ``modules`` holds live modules
    for add ops, else they are built from their specs."""
    info = get_info(model)
    ordered = _canonical(model, E.parse_ops(list(ops_)))
    config = info.fine_tune
    for o in ordered:
        if isinstance(o, E.FineTuneOp):  # DL4J: only the settings given override the model's
            config = config.merged(o.config) if config is not None else o.config
    old_outputs = output_vertices(model)
    previous_frozen = {n.name for n in frozen_nodes(model)}
    run = EditRun(model, config.seed if config is not None else None, modules or {})
    for o in ordered:
        with _blamed(o):
            run.apply(o)
    ops.finish_(model)
    try:
        propagate_(model, example_input(info.preprocessing.input_size))
    except ShapeError as exc:
        raise run.explain(exc) from exc.__cause__
    ops.finish_(model)  # propagation swapped pending modules for real ones
    for o in ordered:
        if isinstance(o, (E.SetFeatureExtractor, E.Freeze, E.Unfreeze)):
            with _blamed(o):
                run.check_present(o, o.vertices)
    _freeze_from_ops(model, ordered, previous_frozen)
    info = get_info(model)
    outputs = output_vertices(model)
    losses = {}
    for vertex in outputs:
        module = model.get_submodule(vertex) if _is_module(model, vertex) else None
        losses[vertex] = module.loss if isinstance(module, L.Output) else info.losses.get(vertex)
    classes = info.classes
    if classes is not None and (outputs != old_outputs or _output_width(model) != len(classes)):
        classes = None  # the output changed: the old class names no longer describe it
    stage = tuple(ordered)
    set_info_(model, info.with_(fine_tune=config, losses={k: v for k, v in losses.items() if v is not None},
                                stages=info.stages + ((stage,) if stage else ()), classes=classes))
    apply_dropout_defaults(model)
    return model


@contextmanager
def _blamed(o: E.Op) -> Iterator[None]:
    """A vertex or shape error raised while ``o`` is applied names ``o`` (its ``op``)."""
    try:
        yield
    except (VertexError, ShapeError) as exc:
        if exc.op is None:
            exc.op = o
        raise


def _output_width(model: fx.GraphModule) -> int | None:
    from .graph import node_shape

    shapes = [node_shape(n) for n in output_node(model).all_input_nodes]
    first = shapes[0] if shapes else None
    return first[-1] if isinstance(first, tuple) and first and isinstance(first[-1], int) else None


def _is_module(model: fx.GraphModule, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def _freeze_from_ops(model: fx.GraphModule, ordered: list[E.Op], previous: set[str]) -> None:
    fe = [v for o in ordered if isinstance(o, E.SetFeatureExtractor) for v in o.vertices]
    extra = [v for o in ordered if isinstance(o, E.Freeze) for v in o.vertices]
    drop = [v for o in ordered if isinstance(o, E.Unfreeze) for v in o.vertices]
    table = vertex_table(model)
    if fe:
        frozen = feature_extractor_nodes(model, fe)
    else:  # no new feature extractor: what was frozen before and still exists stays frozen
        frozen = {n for n in model.graph.nodes if n.name in previous}
    frozen |= {n for v in extra for n in resolve(model, v, table).nodes}
    frozen -= {n for v in drop for n in resolve(model, v, table).nodes}
    apply_frozen_(model, frozen)


def apply_dropout_defaults(model: fx.GraphModule) -> None:
    """The fine-tune configuration's dropout applies to trainable freezeray layers that
    set none themselves (layer settings win)."""
    config = get_info(model).fine_tune
    p = config.dropout if config is not None else 0.0
    for module in model.modules():
        if isinstance(module, L.Layer):
            trainable = any(q.requires_grad for q in module.parameters())
            module.default_dropout = p if trainable else 0.0
