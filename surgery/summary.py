"""``surgery.summary(model)``: every vertex with its op, inputs, output shape, parameter
count and whether it is frozen, then totals (like DL4J's and Keras's summaries)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch.fx as fx

from .graph import example_input, node_shape, propagate_, vertex_of
from .recipe import get_info

__all__ = ["summary", "Summary", "SummaryRow"]


@dataclass(frozen=True)
class SummaryRow:
    vertex: str  # the name that addresses this node
    op: str  # module class, function or method name
    inputs: tuple[str, ...]  # vertex names feeding it
    output_shape: object  # (B, ...) for a batch of 2, or a tuple of shapes
    params: int  # parameters of its module (counted at its first call only)
    frozen: bool  # whether the vertex is frozen
    index: int | None = None  # the layer's index on a chain model (DL4J's MultiLayerNetwork), else None


@dataclass(frozen=True)
class Summary:
    name: str
    rows: tuple[SummaryRow, ...]
    total_params: int
    trainable_params: int
    frozen_params: int

    def __str__(self) -> str:
        header: tuple[str, ...] = ("vertex", "op", "inputs", "output shape", "params", "frozen")
        body: list[tuple[str, ...]] = [
            (r.vertex, r.op, ", ".join(r.inputs), str(r.output_shape), f"{r.params:,}", "frozen" if r.frozen else "")
            for r in self.rows]
        if any(r.index is not None for r in self.rows):  # a chain: its layers' indices first
            header = ("index", *header)
            body = [("" if r.index is None else str(r.index), *b) for r, b in zip(self.rows, body)]
        widths = [min(48, max(len(h), *(len(b[i]) for b in body))) for i, h in enumerate(header)] if body else [len(h) for h in header]
        line = lambda cells: "  ".join(str(c)[:w].ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        rule = "-" * len(line(header))
        return "\n".join([
            f"Model: {self.name}", rule, line(header), rule, *(line(b) for b in body), rule,
            f"Total params:     {self.total_params:,}",
            f"Trainable params: {self.trainable_params:,}",
            f"Frozen params:    {self.frozen_params:,}",
        ])


def summary(model: fx.GraphModule) -> Summary:
    """A table of ``model``'s vertices and parameter totals; ``print()`` it. On a chain
    model, each layer's index (what DL4J's sequential builder addresses) comes first.

    Example:
        >>> print(surgery.summary(surgery.zoo.load("vgg16")))
    """
    info = get_info(model)
    nodes = [n for n in model.graph.nodes if n.op != "output"]
    if any(node_shape(n) is None for n in nodes if n.op != "placeholder"):
        propagate_(model, example_input(info.preprocessing.input_size))
    frozen = set(info.frozen)
    calls = Counter(n.target for n in nodes if n.op == "call_module")
    counted: set[str] = set()
    indices = _layer_indices(model)
    rows = []
    for n in nodes:
        params = 0
        if n.op == "call_module":
            module = model.get_submodule(str(n.target))
            op = type(module).__name__
            if n.target not in counted:
                params = sum(p.numel() for p in module.parameters())
                counted.add(str(n.target))
        elif n.op == "placeholder":
            op = "Input"
        elif n.op == "call_function":
            op = getattr(n.target, "__name__", str(n.target))
        else:
            op = str(n.target)
        shape = node_shape(n) if n.op != "placeholder" else (2, *info.preprocessing.input_size)
        rows.append(SummaryRow(vertex_of(n, calls), op, tuple(vertex_of(a, calls) for a in n.all_input_nodes),
                               shape, params, n.name in frozen, indices.get(n.name)))
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Summary(info.name, tuple(rows), total, trainable, total - trainable)


def _layer_indices(model: fx.GraphModule) -> dict[str, int]:
    """Node name -> layer index on a chain model; empty for any other graph."""
    from .builder import layer_chain
    from .graph import VertexError

    try:
        chain = layer_chain(model)
    except VertexError:
        return {}
    calls = Counter(n.target for n in model.graph.nodes if n.op == "call_module")
    by_vertex = {vertex_of(n, calls): n.name for n in model.graph.nodes if n.op == "call_module"}
    return {by_vertex[v]: i for i, v in enumerate(chain)}
