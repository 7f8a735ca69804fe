"""Losses by name (DL4J's ``LossFunction``s): which activations each fits, the loss of a
batch, and class probabilities for reporting. An :class:`~surgery.layers.Output` layer
names its loss; :mod:`surgery.training.objective` sums the losses of a model's outputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .activations import ACTIVATIONS

__all__ = ["LOSSES", "canonical_loss", "compute_loss", "probabilities"]

ACTIVATION_NAMES = tuple(ACTIVATIONS)

# loss name -> activations it may follow (DL4J's combinations, with logits allowed as "identity")
LOSSES: dict[str, tuple[str, ...]] = {
    "nll": ("softmax", "log_softmax", "identity", "linear"),
    "cross_entropy": ("softmax", "identity", "linear"),
    "bce": ("sigmoid", "identity", "linear"),
    "mse": ACTIVATION_NAMES,
    "mae": ACTIVATION_NAMES,
}
_LOSS_ALIASES = {"mcxent": "cross_entropy", "negative_log_likelihood": "nll", "xent": "bce", "l2": "mse", "l1": "mae"}

def canonical_loss(name: str) -> str:
    name = _LOSS_ALIASES.get(str(name).lower(), str(name).lower())
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid losses: {', '.join(list(LOSSES) + sorted(_LOSS_ALIASES))}")
    return name


def _targets_for(values: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Class indices become one-hot rows when the loss compares whole vectors."""
    if target.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8) and target.dim() == values.dim() - 1:
        return F.one_hot(target.long(), num_classes=values.shape[1]).to(values.dtype)
    return target.to(values.dtype)


def compute_loss(loss: str, values: torch.Tensor, target: torch.Tensor, activation: str | None = None,
                 logits: bool = False, reduction: str = "mean") -> torch.Tensor:
    """The loss of one batch (``reduction``: ``"mean"``, ``"sum"`` or ``"none"`` per row).

    Args:
        loss: a name in :data:`LOSSES`.
        values: the output vertex's values; pre-activation values when ``logits``.
        target: class indices (int) or target values (float).
        activation: the output layer's activation (None for a plain module's output).
        logits: whether ``values`` are pre-activation values of an :class:`Output`.
    """
    loss = canonical_loss(loss)
    act = activation or "identity"
    if loss in ("nll", "cross_entropy"):
        if logits or act in ("identity", "linear"):
            if loss == "nll" and not logits and act in ("identity", "linear"):
                return F.nll_loss(values, target.long(), reduction=reduction)  # DL4J's NLL on log-probabilities
            return F.cross_entropy(values, target.long(), reduction=reduction)
        if act == "log_softmax":
            return F.nll_loss(values, target.long(), reduction=reduction)
        return F.nll_loss(torch.log(values.clamp_min(1e-12)), target.long(), reduction=reduction)
    if loss == "bce":
        t = _targets_for(values, target)
        if logits or act in ("identity", "linear"):
            out = F.binary_cross_entropy_with_logits(values, t, reduction="none")
        else:
            out = F.binary_cross_entropy(values.clamp(1e-7, 1 - 1e-7), t, reduction="none")
        return _reduce(out, reduction)
    out = ACTIVATIONS[act](values) if logits else values
    t = _targets_for(out, target)
    per = F.mse_loss(out, t, reduction="none") if loss == "mse" else F.l1_loss(out, t, reduction="none")
    return _reduce(per, reduction)


def _reduce(per_value: torch.Tensor, reduction: str) -> torch.Tensor:
    """Element losses -> mean over everything, sum, or a mean per row."""
    if reduction == "mean":
        return per_value.mean()
    if reduction == "sum":
        return per_value.sum()
    return per_value.reshape(per_value.shape[0], -1).mean(1)


def probabilities(loss: str, values: torch.Tensor, activation: str | None, logits: bool) -> torch.Tensor:
    """Class scores in [0, 1] for reporting: softmax for the classification losses (of
    logits or of log-probabilities), sigmoid for bce, the values themselves otherwise."""
    loss = canonical_loss(loss)
    act = activation or "identity"
    if loss in ("nll", "cross_entropy"):
        if not logits and act == "softmax":
            return values
        if not logits and act == "log_softmax" or (loss == "nll" and not logits and act in ("identity", "linear")):
            return values.exp()
        return F.softmax(values, dim=1)
    if loss == "bce":
        return values if (not logits and act == "sigmoid") else torch.sigmoid(values)
    return ACTIVATIONS[act](values) if logits else values
