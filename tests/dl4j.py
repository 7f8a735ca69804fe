"""What the ported DL4J tests share: DL4J's small networks as freezeray models, DL4J's
``fit`` (one optimizer step on a batch, the updater's state kept between calls), and
parameter comparisons.

DL4J's feed-forward nets take rows of ``n_in`` values; a freezeray model takes images,
so a row is a (1, 1, n_in) "image" that the first ``Dense`` layer flattens (DL4J inserts
the same preprocessor). A ``MultiLayerNetwork`` is an ``nn.Sequential`` (its layers are
addressed by index), a ``ComputationGraph`` an ``nn.Sequential`` of named layers or a
module whose ``forward`` wires the graph (vertices keep DL4J's names).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

import surgery
from surgery import FineTuneConfiguration
from surgery.training import train_step
from surgery.training.objective import loss_specs


def rows_config(n_in: int) -> dict[str, Any]:
    """The preprocessing of a model fed rows of ``n_in`` values."""
    return {"input_size": (1, 1, n_in), "mean": (0.0,), "std": (1.0,), "crop_pct": 1.0}


def image_config(channels: int, size: int) -> dict[str, Any]:
    return {"input_size": (channels, size, size), "mean": (0.0,) * channels, "std": (1.0,) * channels, "crop_pct": 1.0}


def net(*layers: nn.Module, n_in: int | None = None, image: tuple[int, int] | None = None, **named: nn.Module) -> Any:
    """A freezeray model of ``layers`` (a MultiLayerNetwork: indices) or ``named`` layers
    (a ComputationGraph chain: names), fed rows of ``n_in`` values or ``image=(channels, size)``.
    Layers without ``n_in`` get their weights here, from torch's global generator: seed it
    before making the layers (DL4J's ``.seed(...)``)."""
    module = nn.Sequential(OrderedDict(named)) if named else nn.Sequential(*layers)
    pre = rows_config(n_in) if n_in is not None else image_config(*image)  # type: ignore[misc]
    return surgery.from_module(module, preprocessing=pre)


def graph(module: nn.Module, n_in: int, losses: dict[str, str] | None = None) -> Any:
    """A ComputationGraph written as a module's ``forward``, fed rows of ``n_in`` values."""
    return surgery.from_module(module, preprocessing=rows_config(n_in), losses=losses)


def rows(n: int, width: int, seed: int = 0) -> torch.Tensor:
    """DL4J's ``Nd4j.rand(n, width)`` as model input: (n, 1, 1, width) in [0, 1)."""
    return torch.rand(n, 1, 1, width, generator=torch.Generator().manual_seed(seed))


def values(n: int, width: int, seed: int = 1) -> torch.Tensor:
    """Regression targets in [0, 1)."""
    return torch.rand(n, width, generator=torch.Generator().manual_seed(seed))


def classes(n: int, k: int, seed: int = 2) -> torch.Tensor:
    """Class labels (DL4J's one-hot labels, as indices)."""
    return torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(seed))


class Trainer:
    """DL4J's ``model.fit(data)``: one step of the model's fine-tune configuration on a
    batch, with the updater's state kept between calls (the step every freezeray trainer
    takes, :func:`surgery.training.train_step`)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.config = surgery.get_info(model).fine_tune or FineTuneConfiguration()
        self.optimizer = self.config.build_optimizer(model)
        self.specs = loss_specs(model)

    def fit(self, x: torch.Tensor, y: Any) -> float:
        self.model.train()
        return train_step(self.model, (x,), y, self.optimizer, self.config, self.specs).loss


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys: Any = None, exact: bool = True) -> None:
    """The two state dicts hold the same tensors (for ``keys``, default all of both)."""
    keys = sorted(a) if keys is None else list(keys)
    if keys == sorted(a):
        assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    for k in keys:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def frozen_layers(model: Any, names: Any) -> list[str]:
    """Which of ``names`` are frozen (their parameters need no gradient, and the recipe says so)."""
    out = []
    for name in names:
        params = list(model.get_submodule(name).parameters())
        if surgery.is_frozen(model, name):
            assert all(not p.requires_grad for p in params), name
            out.append(name)
        else:
            assert all(p.requires_grad for p in params), name
    return out
