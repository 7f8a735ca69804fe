"""How one ``build()`` applies its edits so that they compose: :class:`EditRun` remembers
what earlier edits did (which vertices a removal took, which edits set a layer's widths),
so that edits of neighbouring vertices work in any order and number, as DL4J's do, and
edits that truly conflict raise an error naming both.

* a vertex already removed with a vertex it was computed from is not removed again;
* an ``n_out_replace``/``n_in_replace`` of a layer whose input width a producer's
  ``n_out_replace`` opened updates that layer (see :mod:`surgery.ops`);
* an edit naming a vertex an earlier removal took, an addition taking a place another
  removal took, and two width edits whose widths do not meet fail naming both edits.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Sequence

import torch.fx as fx
from torch import nn

from . import edits as E
from . import ops
from .graph import ShapeError, VertexError, resolve, vertex_of, vertex_table
from .specs import build_module

__all__ = ["EditRun", "describe_op"]

log = logging.getLogger(__name__)


def _chain_end(model: fx.GraphModule) -> str:
    """The last vertex of a chain being edited (after removals): where a layer is appended."""
    nodes = [n for n in model.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    if not nodes:
        return next(n.name for n in model.graph.nodes if n.op == "placeholder")
    calls = Counter(n.target for n in nodes if n.op == "call_module")
    return vertex_of(nodes[-1], calls)


def describe_op(op: E.Op) -> str:
    """An op as its builder call, for messages: ``n_out_replace('fc2', 1024)``."""
    if isinstance(op, E.NOutReplace):
        return f"n_out_replace({op.vertex!r}, {op.n_out})"
    if isinstance(op, E.NInReplace):
        return f"n_in_replace({op.vertex!r}, {op.n_in})"
    if isinstance(op, (E.AddLayer, E.AddVertex)):
        return f"{op.op}({op.name!r})"
    vertex = getattr(op, "vertex", None)
    if isinstance(vertex, str):
        return f"{op.op}({vertex!r})"
    vertices = getattr(op, "vertices", None)
    if vertices is not None:
        return f"{op.op}({', '.join(repr(v) for v in vertices)})"
    return f"{op.op}(...)"


class EditRun:
    """One build: applies ops in canonical order and remembers what earlier ops did, so
    that edits of neighbouring vertices compose (a vertex already removed with what it
    was computed from is not removed again; an edit of a width another edit opened
    updates it) and edits that truly conflict raise an error naming both."""

    def __init__(self, model: fx.GraphModule, seed: int | None, modules: dict[str, nn.Module]) -> None:
        self.model, self.seed, self.modules = model, seed, modules
        self.removed: dict[str, E.Op] = {}  # vertex name -> the removal (this build) that took it
        self.widths: dict[str, list[str]] = {}  # module target -> the edits that set its widths
        # a kept place (remove_vertex_keep_connections) -> the removal that took it
        self.places: dict[str, E.RemoveVertexKeepConnections | E.RemoveVertexAndConnections] = {}

    def apply(self, o: E.Op) -> None:
        if isinstance(o, (E.RemoveVertexKeepConnections, E.RemoveVertexAndConnections)):
            self._remove(o)
        elif isinstance(o, E.NOutReplace):
            self.check_present(o, [o.vertex])
            fan_out = o.fan_out_init if o.fan_out_init is not None else o.weight_init
            rebuilt = ops.n_out_replace_(self.model, o.vertex, o.n_out, o.weight_init, fan_out, self.seed)
            self.widths.setdefault(o.vertex, []).append(describe_op(o))
            for target in rebuilt:
                self.widths.setdefault(target, []).append(f"{describe_op(o)} (its input width)")
        elif isinstance(o, E.NInReplace):
            self.check_present(o, [o.vertex])
            ops.n_in_replace_(self.model, o.vertex, o.n_in, o.weight_init, self.seed)
            self.widths.setdefault(o.vertex, []).append(describe_op(o))
        elif isinstance(o, (E.AddLayer, E.AddVertex)):
            self._add(o)
        elif isinstance(o, E.SetOutputs):
            self.check_present(o, o.vertices)
            ops.set_outputs_(self.model, o.vertices)

    def _names(self) -> tuple[set[str], set[str]]:
        return set(vertex_table(self.model)), {h.meta[ops.HOLE_KEY] for h in ops.holes(self.model)}

    def _remove(self, o: E.RemoveVertexKeepConnections | E.RemoveVertexAndConnections) -> None:
        model, vertex = self.model, o.vertex
        names, places = self._names()
        if isinstance(o, E.RemoveVertexAndConnections) and vertex not in names:
            if vertex in places:
                raise VertexError(f"vertex {vertex!r} is removed twice: {describe_op(self.removed[vertex])} and "
                                  f"{describe_op(o)} conflict; keep one")
            if vertex in self.removed:  # already removed with a vertex it was computed from: nothing left to do
                log.debug("%s: already removed by %s", describe_op(o), describe_op(self.removed[vertex]))
                return
            resolve(model, vertex)  # unknown: raises with close names
        if isinstance(o, E.RemoveVertexKeepConnections):
            ops.remove_keep_connections_(model, vertex)
        else:
            ops.remove_and_connections_(model, vertex)
        after, places_after = self._names()
        for name in sorted((names - after) | (places - places_after) | {vertex}):
            self.removed.setdefault(name, o)
        for name in places - places_after:
            self.places[name] = o

    def check_present(self, o: E.Op, vertices: Sequence[str]) -> None:
        """Raise, naming both edits, when ``o`` names a vertex an earlier removal took."""
        names = set(vertex_table(self.model))
        for vertex in vertices:
            by = self.removed.get(vertex)
            if by is None or vertex in names:
                continue
            how = "" if getattr(by, "vertex", None) == vertex else f" (it is computed from {getattr(by, 'vertex', '?')!r})"
            raise VertexError(f"{describe_op(o)} names vertex {vertex!r}, which {describe_op(by)} removes{how}: these "
                              "edits conflict; drop one of them, or add a vertex with that name first", vertex)

    def _add(self, o: E.AddLayer | E.AddVertex) -> None:
        model = self.model
        module = self.modules.get(o.name)
        if module is None:
            spec = o.spec()
            if spec is None:
                raise ValueError(f"{o.op}({o.name!r}): the recipe has no description of its module")
            module = build_module(spec)
        appending = isinstance(o, E.AddLayer) and o.append
        inputs = [_chain_end(model)] if appending else list(o.inputs)
        self.check_present(o, inputs)
        by = self.places.get(o.name)
        if not inputs and by is not None:
            raise VertexError(f"{describe_op(o)} takes the place of vertex {o.name!r} (remove_vertex_keep_connections"
                              f"({o.name!r})), but {describe_op(by)} removes that place ({o.name!r} is computed from "
                              f"{by.vertex!r}): these edits conflict; give {describe_op(o)} its inputs, or keep {by.vertex!r}")
        ops.add_module_(model, o.name, module, inputs, merge=isinstance(o, E.AddLayer), seed=self.seed)
        if appending:  # the appended layer is the chain's new end, and its output
            ops.set_outputs_(model, [o.name])

    def explain(self, exc: ShapeError) -> ShapeError:
        """A shape error at a vertex two edits gave widths to names both edits."""
        edits = self.widths.get(exc.vertex or "", [])
        if len(edits) < 2:
            return exc
        return ShapeError(f"{exc}; these edits set the widths of {exc.vertex!r} and conflict: {'; '.join(edits)}", exc.vertex)
