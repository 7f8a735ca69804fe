"""Fingerprints: a short hash that changes whenever a model's computation could change.

``frozen_fingerprint`` covers what featurization depends on: the frozen prefix's
structure (its generated code and module types/settings), its weights and buffers, and
the boundary. ``fingerprint`` covers the whole model and its recipe.
"""

from __future__ import annotations

import hashlib
import json

import torch
import torch.fx as fx

from .recipe import get_info

__all__ = ["fingerprint", "frozen_fingerprint", "hash_tensors"]


def hash_tensors(h: "hashlib._Hash", state: dict[str, torch.Tensor]) -> None:
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def _structure(h: "hashlib._Hash", gm: fx.GraphModule) -> None:
    h.update(gm.code.encode())
    for name, module in sorted(gm.named_modules()):
        if name:
            h.update(f"{name}:{type(module).__module__}.{type(module).__qualname__}:{module.extra_repr()}".encode())


def frozen_fingerprint(model: fx.GraphModule) -> str:
    """Hash of the frozen prefix (structure, weights, buffers) and its boundary."""
    from .helper import split

    parts = split(model)
    h = hashlib.sha256(b"freezeray.frozen/1\n")
    _structure(h, parts.frozen)
    h.update(json.dumps(parts.boundary).encode())
    hash_tensors(h, parts.frozen.state_dict())
    return h.hexdigest()[:32]


def fingerprint(model: fx.GraphModule) -> str:
    """Hash of the whole model: structure, weights, frozen set, losses, preprocessing."""
    info = get_info(model)
    h = hashlib.sha256(b"freezeray.model/1\n")
    _structure(h, model)
    h.update(json.dumps({
        "frozen": sorted(info.frozen),
        "losses": info.losses,
        "preprocessing": info.preprocessing.to_dict(),
        "fine_tune": info.fine_tune.to_dict() if info.fine_tune else None,
    }, sort_keys=True).encode())
    hash_tensors(h, model.state_dict())
    return h.hexdigest()[:32]
