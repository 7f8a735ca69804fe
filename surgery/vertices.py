"""Parameter-free graph vertices for ``TransferLearning.add_vertex`` (DL4J's
``MergeVertex``, ``ElementWiseVertex``, ``SubsetVertex`` and friends).

Each takes its inputs as separate arguments, in the order given to ``add_vertex``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GraphVertex", "Merge", "ElementWise", "Subset", "Scale", "Reshape", "L2Normalize", "VERTEX_TYPES"]


class GraphVertex(nn.Module):
    """Base of freezeray's vertices: no parameters, a spec for recipes."""

    kind = "GraphVertex"

    def spec(self) -> dict[str, Any]:
        return {}

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, **self.spec()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GraphVertex":
        return cls(**{k: v for k, v in d.items() if k != "type"})


class Merge(GraphVertex):
    """Concatenate inputs along ``dim`` (default: channels/features), DL4J's ``MergeVertex``."""

    kind = "Merge"

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = int(dim)

    def spec(self) -> dict[str, Any]:
        return {"dim": self.dim}

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.cat(xs, dim=self.dim)


ElementWiseOp = Literal["add", "subtract", "product", "mean", "max", "min"]


class ElementWise(GraphVertex):
    """Combine same-shaped inputs element by element, DL4J's ``ElementWiseVertex``.

    ``subtract`` takes exactly two inputs (first minus second).
    """

    kind = "ElementWise"
    OPS = ("add", "subtract", "product", "mean", "max", "min")

    def __init__(self, op: ElementWiseOp = "add") -> None:
        super().__init__()
        if op not in self.OPS:
            raise ValueError(f"unknown element-wise op {op!r}; valid ops: {', '.join(self.OPS)}")
        self.op = op

    def spec(self) -> dict[str, Any]:
        return {"op": self.op}

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        if self.op == "subtract":
            if len(xs) != 2:
                raise ValueError(f"ElementWise('subtract') takes 2 inputs, got {len(xs)}")
            return xs[0] - xs[1]
        stacked = torch.stack(torch.broadcast_tensors(*xs))  # (K, *shape)
        if self.op == "add":
            return stacked.sum(0)
        if self.op == "product":
            return stacked.prod(0)
        if self.op == "mean":
            return stacked.mean(0)
        if self.op == "max":
            return stacked.amax(0)
        return stacked.amin(0)


class Subset(GraphVertex):
    """Keep ``start:stop`` along ``dim``, DL4J's ``SubsetVertex``.

    Unlike DL4J's inclusive ``to``, ``stop`` is exclusive, as in a Python slice. With
    several inputs, they are concatenated along ``dim`` first.
    """

    kind = "Subset"

    def __init__(self, start: int, stop: int, dim: int = 1) -> None:
        super().__init__()
        if not (isinstance(start, int) and isinstance(stop, int)) or start < 0 or stop <= start:
            raise ValueError(f"Subset needs 0 <= start < stop, got start={start!r}, stop={stop!r}")
        self.start, self.stop, self.dim = start, stop, int(dim)

    def spec(self) -> dict[str, Any]:
        return {"start": self.start, "stop": self.stop, "dim": self.dim}

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        x = xs[0] if len(xs) == 1 else torch.cat(xs, dim=self.dim)
        if self.stop > x.shape[self.dim]:
            raise ValueError(f"Subset {self.start}:{self.stop} is past the input's size {x.shape[self.dim]} on dim {self.dim}")
        return x.narrow(self.dim, self.start, self.stop - self.start)


class Scale(GraphVertex):
    """Multiply the input by a constant, DL4J's ``ScaleVertex``."""

    kind = "Scale"

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = float(factor)

    def spec(self) -> dict[str, Any]:
        return {"factor": self.factor}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


class Reshape(GraphVertex):
    """Reshape each example to ``shape`` (the batch dimension is kept), DL4J's ``ReshapeVertex``."""

    kind = "Reshape"

    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Reshape":
        return cls(*d["shape"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)


class L2Normalize(GraphVertex):
    """Scale each example to unit L2 norm along ``dim``, DL4J's ``L2NormalizeVertex``."""

    kind = "L2Normalize"

    def __init__(self, dim: int = 1, eps: float = 1e-8) -> None:
        super().__init__()
        self.dim, self.eps = int(dim), float(eps)

    def spec(self) -> dict[str, Any]:
        return {"dim": self.dim, "eps": self.eps}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=self.dim, eps=self.eps)


VERTEX_TYPES: dict[str, type[GraphVertex]] = {
    cls.kind: cls for cls in (Merge, ElementWise, Subset, Scale, Reshape, L2Normalize)
}
