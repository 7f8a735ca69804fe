"""The training objective of a model: one loss per output vertex, plus the fine-tune
configuration's L1/L2 penalty. The helper, Ray Train workers and hand-written loops all
compute it here, so they optimise exactly the same thing."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx

from . import layers as L
from .recipe import get_info

__all__ = ["LossSpec", "loss_specs", "objective", "check_targets"]


@dataclass(frozen=True)
class LossSpec:
    """How one output vertex is scored."""

    vertex: str  # output vertex name
    loss: str  # a name in surgery.layers.LOSSES
    activation: str | None  # the Output layer's activation, None for a plain module
    logits: bool  # the output is an Output layer, which emits pre-activation values while training
    n_out: int | None  # output width, when known

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LossSpec":
        return cls(**d)


def loss_specs(model: fx.GraphModule) -> tuple[LossSpec, ...]:
    """One :class:`LossSpec` per output of ``model``, in output order.

    Raises:
        ValueError: an output without a loss (add a ``surgery.layers.Output``).
    """
    from .graph import node_shape

    info = get_info(model)
    out = next(n for n in model.graph.nodes if n.op == "output")
    specs = []
    from collections import Counter

    from .graph import vertex_of

    calls = Counter(n.target for n in model.graph.nodes if n.op == "call_module")
    for node in out.all_input_nodes:
        vertex = vertex_of(node, calls)
        module = model.get_submodule(str(node.target)) if node.op == "call_module" else None
        loss = module.loss if isinstance(module, L.Output) else info.losses.get(vertex)
        if loss is None:
            raise ValueError(
                f"output {vertex!r} has no loss; end the model with surgery.layers.Output(n_out, loss=...) "
                f"(losses: {', '.join(L.LOSSES)})"
            )
        shape = node_shape(node)
        width = shape[-1] if isinstance(shape, tuple) and shape and isinstance(shape[-1], int) else None
        specs.append(LossSpec(vertex, loss, module.activation if isinstance(module, L.Output) else None,
                              isinstance(module, L.Output), width))
    return tuple(specs)


def objective(specs: Sequence[LossSpec], outputs: Any, targets: Any) -> torch.Tensor:
    """The summed loss of ``outputs`` (one tensor, or a tuple in output order) against
    ``targets`` (one tensor, or a tuple). Outputs of ``Output`` layers must be their
    pre-activation values (run the model under ``surgery.layers.emit_logits``)."""
    outs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    tgts = targets if isinstance(targets, (tuple, list)) else (targets,)
    if len(outs) != len(specs) or len(tgts) != len(specs):
        raise ValueError(f"the model has {len(specs)} outputs; got {len(outs)} outputs and {len(tgts)} targets")
    total = None
    for spec, o, t in zip(specs, outs, tgts):
        term = L.compute_loss(spec.loss, o, t, spec.activation, logits=spec.logits)
        total = term if total is None else total + term
    assert total is not None  # specs is not empty
    return total


def check_targets(specs: Sequence[LossSpec], classes: int | None, labels: Sequence[int] | None = None) -> None:
    """Refuse labels that the (single) output cannot score, before any training.

    Raises:
        ValueError: a label outside the output's classes, or a loss that does not fit
            class labels (e.g. ``bce``/``mse`` whose width is not the number of classes).
    """
    if len(specs) != 1:
        raise ValueError(f"training on class labels needs a model with one output; it has {len(specs)}")
    spec = specs[0]
    if spec.n_out is None:
        return
    if classes is not None:
        if spec.loss in ("nll", "cross_entropy") and classes > spec.n_out:
            raise ValueError(
                f"the data has {classes} classes but output {spec.vertex!r} has {spec.n_out} units; "
                f"use n_out_replace({spec.vertex!r}, {classes}) or a new Output({classes})"
            )
        if spec.loss in ("bce", "mse", "mae") and classes != spec.n_out:
            raise ValueError(
                f"loss {spec.loss!r} on output {spec.vertex!r} compares {spec.n_out} values with one-hot labels of "
                f"{classes} classes; the output needs {classes} units (or use loss='nll' / 'cross_entropy')"
            )
    if labels is not None:
        bad = sorted({int(v) for v in labels if int(v) < 0 or int(v) >= spec.n_out})
        if bad:
            raise ValueError(
                f"labels {bad[:10]} are outside output {spec.vertex!r}'s {spec.n_out} classes (0..{spec.n_out - 1})"
            )
