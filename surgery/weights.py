"""Reading weight files safely: safetensors, or torch files that load with
``weights_only=True``. Nothing else is ever unpickled."""

from __future__ import annotations

import io
import pickle
import warnings
from typing import Any, Callable

import torch
from safetensors.torch import load as safetensors_load
from torch import nn

from freezeray import storage
from freezeray.errors import InvalidInput

__all__ = ["read_state_dict", "load_into_", "WeightsError"]


class WeightsError(InvalidInput, ValueError):
    """A weights file that cannot be read safely or does not fit the model."""


def read_state_dict(uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a weights-only torch file, local or remote.

    Torch files that wrap the state dict under ``"state_dict"`` or ``"model"`` are unwrapped.

    Raises:
        WeightsError: the file is neither, or is a pickle holding more than tensors.
    """
    try:
        data = storage.read_bytes(uri, storage_options)
    except FileNotFoundError:
        raise WeightsError(f"weights file {uri!r} does not exist") from None
    if _is_safetensors(data):
        try:
            return dict(safetensors_load(data))
        except Exception as exc:
            raise WeightsError(f"{uri!r} looks like safetensors but cannot be read: {exc}") from exc
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WeightsError(
            f"{uri!r} is not a weights-only file: loading it would unpickle arbitrary objects, which freezeray "
            f"never does ({str(exc).splitlines()[0]}). Save the state dict with safetensors or "
            "torch.save(model.state_dict(), path)."
        ) from None
    except Exception as exc:
        raise WeightsError(f"{uri!r} is neither a safetensors file nor a torch weights file: {exc}") from exc
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{uri!r} does not hold a state dict (a mapping of names to tensors)")
    return dict(obj)


def _is_safetensors(data: bytes) -> bool:
    # safetensors: an 8-byte little-endian header length, then a JSON header starting with '{'
    if len(data) < 10:
        return False
    n = int.from_bytes(data[:8], "little")
    return 0 < n <= len(data) - 8 and data[8:9] == b"{"


def load_into_(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    source: str,
    rename: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    num_classes: int | None = None,
) -> list[str]:
    """Load ``state`` into ``module``, checking every name and shape first. This is done
    in place; on any mismatch nothing is loaded.

    With ``num_classes`` (a model built for another number of classes than the file's),
    the classifier's tensors, those whose first dimension is ``num_classes`` in the model
    and something else in the file, are left out: the model keeps its fresh classifier, as
    timm's ``reset_classifier`` gives one. A warning names them. Returns their names.

    Raises:
        WeightsError: listing missing and unexpected names and every other shape mismatch.
    """
    if rename is not None:
        state = rename(state)
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    left_out = [k for k in own if k in state and num_classes is not None and tuple(state[k].shape) != tuple(own[k].shape)
                and own[k].dim() >= 1 and own[k].shape[0] == num_classes and state[k].shape[0] != num_classes]
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state and k not in left_out and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches ({'; '.join(mismatched[:5])}{'; ...' if len(mismatched) > 5 else ''})")
        if missing:
            parts.append(f"{len(missing)} tensors missing from the file ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors ({', '.join(unexpected[:5])}{', ...' if len(unexpected) > 5 else ''})")
        raise WeightsError(f"weights {source!r} do not fit {type(module).__name__}: " + "; ".join(parts))
    if left_out:
        warnings.warn(f"loaded {len(own) - len(left_out)} of {len(own)} tensors from {source!r}; left out the "
                      f"classifier's {', '.join(left_out)} (the file has {state[left_out[0]].shape[0]} classes, the model "
                      f"{num_classes}: it keeps a new classifier)", stacklevel=3)
    module.load_state_dict({k: v for k, v in state.items() if k not in left_out}, strict=not left_out)
    return left_out
