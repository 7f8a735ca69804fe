"""The training objective of a model: one loss per output vertex, weighted by the
fine-tune configuration's ``loss_weights`` (default 1 each) and summed, plus the
configuration's L1/L2 penalty. The helper, Ray Train workers and hand-written loops all
compute it here, so they optimise exactly the same thing.

Targets: one per output (a tuple or list, in output order, as DL4J's ``MultiDataSet``
labels), or one tensor that every output is scored against (class labels of a data set
trained into a main and an auxiliary head, as ``fit_head`` and ``finetune`` do)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx

from .. import layers as L
from ..recipe import get_info

__all__ = ["LossSpec", "loss_specs", "objective", "loss_terms", "output_targets", "check_targets"]


@dataclass(frozen=True)
class LossSpec:
    """How one output vertex is scored."""

    vertex: str  # output vertex name
    loss: str  # a name in surgery.layers.LOSSES
    activation: str | None  # the Output layer's activation, None for a plain module
    logits: bool  # the output is an Output layer, which emits pre-activation values while training
    n_out: int | None  # output width, when known
    weight: float = 1.0  # the loss's weight in the model's objective (FineTuneConfiguration.loss_weights)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LossSpec":
        return cls(**d)


def loss_specs(model: fx.GraphModule) -> tuple[LossSpec, ...]:
    """One :class:`LossSpec` per output of ``model``, in output order.

    Raises:
        ValueError: an output without a loss (add a ``surgery.layers.Output``), or
            ``loss_weights`` naming a vertex that is not an output.
    """
    from ..graph import node_shape, output_node, output_vertices

    info = get_info(model)
    specs = []
    weights = dict(info.fine_tune.loss_weights) if info.fine_tune is not None else {}
    names = output_vertices(model)
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ValueError(f"loss_weights names {', '.join(map(repr, unknown))}, which the model does not output; "
                         f"its outputs: {', '.join(names)}")
    for node, vertex in zip(output_node(model).all_input_nodes, names):
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
                              isinstance(module, L.Output), width, float(weights.get(vertex, 1.0))))
    return tuple(specs)


def output_targets(specs: Sequence[LossSpec], targets: Any) -> tuple[torch.Tensor, ...]:
    """One target per output: ``targets`` as given (a tuple or list, in output order), or
    one tensor shared by every output.

    Raises:
        ValueError: as many targets as neither one nor the outputs, or targets whose
            batch sizes differ.
    """
    tgts = tuple(targets) if isinstance(targets, (tuple, list)) else (targets,) * len(specs)
    if len(tgts) != len(specs):
        names = ", ".join(s.vertex for s in specs)
        raise ValueError(f"the model has {len(specs)} outputs ({names}); got {len(tgts)} targets: give one per output, "
                         "in this order, or one tensor that every output is scored against")
    bad = [i for i, t in enumerate(tgts) if not isinstance(t, torch.Tensor)]
    if bad:
        raise ValueError(f"targets must be tensors; target {bad[0]} ({specs[bad[0]].vertex!r}) is a {type(tgts[bad[0]]).__name__}")
    rows = {int(t.shape[0]) if t.dim() else 0 for t in tgts}
    if len(rows) > 1:
        raise ValueError(f"the targets of the outputs have different batch sizes: "
                         f"{', '.join(f'{s.vertex}: {tuple(t.shape)}' for s, t in zip(specs, tgts))}")
    return tgts


def loss_terms(specs: Sequence[LossSpec], outputs: Any, targets: Any) -> list[torch.Tensor]:
    """Each output's mean loss (unweighted), in output order. Outputs of ``Output``
    layers must be their pre-activation values (run the model under
    ``surgery.layers.emit_logits``)."""
    outs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    if len(outs) != len(specs):
        raise ValueError(f"the model has {len(specs)} outputs; got {len(outs)} outputs")
    tgts = output_targets(specs, targets)
    for spec, o, t in zip(specs, outs, tgts):
        _check_target(spec, o, t)
    return [L.compute_loss(spec.loss, o, t, spec.activation, logits=spec.logits) for spec, o, t in zip(specs, outs, tgts)]


def _check_target(spec: LossSpec, out: Any, target: torch.Tensor) -> None:
    """A target that fits its output: class indices (one value per row, any loss), or for
    ``bce``/``mse``/``mae`` values of the output's shape. Broadcasting would silently
    compute something else."""
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
    if shape is None:
        raise ValueError(f"output {spec.vertex!r} is a {type(out).__name__}, not a tensor")
    indices = target.dim() == len(shape) - 1 and tuple(target.shape) == shape[:-1]
    if indices and (spec.loss in ("nll", "cross_entropy") or not target.is_floating_point()):
        return
    if spec.loss not in ("nll", "cross_entropy") and tuple(target.shape) == shape:
        return
    wanted = (f"class indices shaped {shape[:-1]}" if spec.loss in ("nll", "cross_entropy")
              else f"values shaped {shape} or class indices shaped {shape[:-1]}")
    raise ValueError(f"output {spec.vertex!r} ({spec.loss}) is shaped {shape}, but its target is shaped "
                     f"{tuple(target.shape)}: give {wanted}")


def objective(specs: Sequence[LossSpec], outputs: Any, targets: Any) -> torch.Tensor:
    """The weighted sum of the losses of ``outputs`` (one tensor, or a tuple in output
    order) against ``targets`` (see :func:`output_targets`)."""
    terms = loss_terms(specs, outputs, targets)
    total = None
    for spec, term in zip(specs, terms):
        weighted = term if spec.weight == 1.0 else spec.weight * term
        total = weighted if total is None else total + weighted
    assert total is not None  # specs is not empty
    return total


def check_targets(specs: Sequence[LossSpec], classes: int | None, labels: Sequence[int] | None = None) -> None:
    """Refuse class labels that an output cannot score, before any training. Every output
    is scored against the same labels (a main and an auxiliary head, say).

    Raises:
        ValueError: a label outside an output's classes, or a loss that does not fit
            class labels (e.g. ``bce``/``mse`` whose width is not the number of classes),
            naming the output.
    """
    for spec in specs:
        if spec.n_out is None:
            continue
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
