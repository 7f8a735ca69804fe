"""Layers a transfer-learning recipe adds: DL4J's ``DenseLayer``, ``OutputLayer`` and
``ConvolutionLayer``, with activations, weight initialisation and losses by name.

``n_in`` is left open and inferred by shape propagation when the model is built.
Plain ``torch.nn.Module``s are accepted by the builder too; :func:`surgery.specs.describe`
says how a module is written into a recipe. Losses live in :mod:`surgery.losses`
(``compute_loss`` and ``probabilities`` are re-exported here), activations in
:mod:`surgery.activations`.

Dropout follows DL4J: ``dropout`` is the probability of dropping each *input* of the
layer while training (Keras puts it after the layer; the computation is the same one
layer later).
"""

from __future__ import annotations

import hashlib
import math
import re
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .activations import ACTIVATIONS
from .losses import LOSSES, canonical_loss, compute_loss, probabilities

__all__ = [
    "Layer",
    "Dense",
    "Output",
    "Convolution",
    "ACTIVATIONS",
    "LOSSES",
    "WEIGHT_INITS",
    "LAYER_TYPES",
    "activation_fn",
    "init_weight_",
    "parse_weight_init",
    "emit_logits",
    "compute_loss",
    "probabilities",
    "layer_generator",
]

WEIGHT_INITS = (
    "xavier", "xavier_uniform", "relu", "he", "relu_uniform", "he_uniform", "lecun",
    "normal(mean, std)", "uniform(low, high)", "constant(value)", "zeros", "ones", "default",
)


def _choice_error(kind: str, value: Any, choices: Any) -> ValueError:
    plural = {"loss": "losses", "activation": "activations", "weight_init": "weight_inits"}.get(kind, kind + "s")
    return ValueError(f"unknown {kind} {value!r}; valid {plural}: {', '.join(choices)}")


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation function called ``name`` (see :data:`ACTIVATIONS`)."""
    if name not in ACTIVATIONS:
        raise _choice_error("activation", name, ACTIVATIONS)
    return ACTIVATIONS[name]


_INIT_CALL = re.compile(r"^\s*(normal|uniform|constant)\s*\(([^)]*)\)\s*$")


def parse_weight_init(spec: str | dict | None) -> tuple[str, tuple[float, ...]]:
    """``"xavier"``, ``"normal(0, 0.01)"`` or ``{"name": "normal", "mean": 0, "std": 0.01}``
    -> ``(name, args)``. Raises ``ValueError`` naming the valid schemes."""
    if spec is None:
        return "xavier", ()
    if isinstance(spec, dict):
        spec = dict(spec)
        name = str(spec.pop("name", ""))
        order = {"normal": ("mean", "std"), "uniform": ("low", "high"), "constant": ("value",)}.get(name, ())
        unknown = set(spec) - set(order)
        if unknown:
            raise ValueError(f"weight_init {name!r} takes {list(order) or 'no arguments'}, got {sorted(unknown)}")
        return parse_weight_init(f"{name}({', '.join(str(spec[k]) for k in order if k in spec)})" if order else name)
    text = str(spec).strip().lower()
    match = _INIT_CALL.match(text)
    if match:
        name = match.group(1)
        try:
            args = tuple(float(a) for a in match.group(2).split(",") if a.strip())
        except ValueError:
            raise ValueError(f"weight_init {spec!r}: arguments must be numbers") from None
        wanted = {"normal": 2, "uniform": 2, "constant": 1}[name]
        if len(args) != wanted:
            raise ValueError(f"weight_init {spec!r}: {name} takes {wanted} numbers")
        if name == "normal" and args[1] <= 0:
            raise ValueError(f"weight_init {spec!r}: std must be positive")
        return name, args
    plain = {"xavier", "xavier_uniform", "relu", "he", "relu_uniform", "he_uniform", "lecun",
             "zeros", "ones", "default", "normal", "uniform"}
    if text not in plain:
        raise _choice_error("weight_init", spec, WEIGHT_INITS)
    defaults = {"normal": ("normal", (0.0, 0.01)), "uniform": ("uniform", (-0.05, 0.05))}
    return defaults.get(text, (text, ()))


def init_weight_(weight: torch.Tensor, spec: str | dict | None, generator: torch.Generator | None = None) -> None:
    """Initialise ``weight`` in place with the named scheme (DL4J's ``WeightInit``).

    ``xavier`` is DL4J's XAVIER (a normal with variance 2 / (fan_in + fan_out));
    ``relu``/``he`` is a normal with variance 2 / fan_in. This is done in place.
    """
    name, args = parse_weight_init(spec)
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(weight) if weight.dim() >= 2 else (weight.numel(),) * 2
    with torch.no_grad():
        if name == "xavier":
            weight.normal_(0.0, math.sqrt(2.0 / (fan_in + fan_out)), generator=generator)
        elif name == "xavier_uniform":
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            weight.uniform_(-bound, bound, generator=generator)
        elif name in ("relu", "he"):
            weight.normal_(0.0, math.sqrt(2.0 / fan_in), generator=generator)
        elif name in ("relu_uniform", "he_uniform"):
            bound = math.sqrt(6.0 / fan_in)
            weight.uniform_(-bound, bound, generator=generator)
        elif name == "lecun":
            weight.normal_(0.0, math.sqrt(1.0 / fan_in), generator=generator)
        elif name == "normal":
            weight.normal_(args[0], args[1], generator=generator)
        elif name == "uniform":
            weight.uniform_(args[0], args[1], generator=generator)
        elif name == "constant":
            weight.fill_(args[0])
        elif name == "zeros":
            weight.zero_()
        elif name == "ones":
            weight.fill_(1.0)
        elif name == "default":  # PyTorch's own default for Linear/Conv (kaiming uniform, a=sqrt(5))
            bound = 1.0 / math.sqrt(fan_in) if fan_in else 0.0
            weight.uniform_(-bound, bound, generator=generator)
        else:  # pragma: no cover - parse_weight_init guarantees a known name
            raise AssertionError(name)


def layer_generator(seed: int | None, name: str) -> torch.Generator | None:
    """A generator for initialising layer ``name``: derived from ``(seed, name)`` so that
    the result does not depend on the order layers are added; None uses torch's global RNG."""
    if seed is None:
        return None
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


class Layer(nn.Module):
    """Base of freezeray's layers: a spec that can be written into a recipe, an open
    ``n_in`` that shape propagation fills, a weight-init scheme, an optional learning
    rate and input dropout that override the fine-tune configuration."""

    kind = "Layer"

    def __init__(
        self,
        n_out: int,
        activation: str,
        weight_init: str | dict | None,
        lr: float | None,
        dropout: float | None,
        n_in: int | None,
        bias: bool,
    ) -> None:
        super().__init__()
        if not isinstance(n_out, int) or isinstance(n_out, bool) or n_out <= 0:
            raise ValueError(f"{self.kind}: n_out must be a positive integer, got {n_out!r}")
        if n_in is not None and (not isinstance(n_in, int) or n_in <= 0):
            raise ValueError(f"{self.kind}: n_in must be a positive integer or None, got {n_in!r}")
        activation_fn(activation)  # validates the name
        parse_weight_init(weight_init)
        if lr is not None and not (isinstance(lr, (int, float)) and lr >= 0):
            raise ValueError(f"{self.kind}: lr must be a non-negative number or None, got {lr!r}")
        if dropout is not None and not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise ValueError(f"{self.kind}: dropout must be in [0, 1) or None, got {dropout!r}")
        self.n_out = n_out
        self.n_in = n_in
        self.activation = activation
        self.weight_init = weight_init if weight_init is not None else "xavier"
        self.lr = None if lr is None else float(lr)
        self.dropout = None if dropout is None else float(dropout)
        self.bias = bias
        self.default_dropout = 0.0  # set from the FineTuneConfiguration for trainable layers
        self.init_seed: int | None = None  # set by the builder: a generator per (seed, name)
        self.init_name = ""

    # -- construction -------------------------------------------------------------------
    @property
    def materialized(self) -> bool:
        return self.n_in is not None and self._core() is not None

    def _core(self) -> nn.Module | None:
        raise NotImplementedError

    def infer_n_in(self, x: torch.Tensor) -> int:
        return int(x.shape[1])

    def materialize(self, n_in: int) -> None:
        """Create the weights for an input width of ``n_in``. This is done in place."""
        self.n_in = int(n_in)
        self._build(self.n_in)
        generator = layer_generator(self.init_seed, self.init_name) if self.init_seed is not None else None
        core: Any = self._core()
        init_weight_(core.weight, self.weight_init, generator)
        if core.bias is not None:
            with torch.no_grad():
                core.bias.zero_()

    def _build(self, n_in: int) -> None:
        raise NotImplementedError

    def expects(self) -> str:
        return f"expects {self.n_in} inputs" if self.n_in else ""

    def spec(self) -> dict[str, Any]:
        """The arguments that rebuild this layer (without weights)."""
        d = {"n_out": self.n_out, "activation": self.activation, "weight_init": self.weight_init,
             "lr": self.lr, "dropout": self.dropout, "bias": self.bias}
        return d

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, **self.spec()}

    # -- forward ------------------------------------------------------------------------
    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        p = self.dropout if self.dropout is not None else self.default_dropout
        return F.dropout(x, p=p, training=True) if self.training and p > 0 else x

    def extra_repr(self) -> str:
        return f"n_in={self.n_in}, n_out={self.n_out}, activation={self.activation}"


class Dense(Layer):
    """A fully connected layer with its activation (DL4J's ``DenseLayer``).

    Inputs with more than two dimensions are flattened first (DL4J inserts the same
    CNN-to-feed-forward preprocessor).

    Example:
        >>> Dense(256, activation="tanh", weight_init="xavier", dropout=0.5)
    """

    kind = "Dense"

    def __init__(
        self,
        n_out: int,
        activation: str = "relu",
        weight_init: str | dict | None = "xavier",
        lr: float | None = None,
        dropout: float | None = None,
        n_in: int | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__(n_out, activation, weight_init, lr, dropout, n_in, bias)
        self.linear: nn.Linear | None = None
        if n_in is not None:
            self.materialize(n_in)

    def _core(self) -> nn.Module | None:
        return self.linear

    def _build(self, n_in: int) -> None:
        # created on meta, then given memory: materialize() initialises it once, not twice
        self.linear = nn.Linear(n_in, self.n_out, bias=self.bias, device="meta").to_empty(device=torch.get_default_device())

    def infer_n_in(self, x: torch.Tensor) -> int:
        return int(math.prod(x.shape[1:]))

    def _pre(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() > 2:
            x = x.flatten(1)  # (B, C, H, W) -> (B, C*H*W)
        assert self.linear is not None, "materialized before the first call"
        return self.linear(self._drop(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ACTIVATIONS[self.activation](self._pre(x))


class Output(Dense):
    """An output layer: a dense layer with a loss (DL4J's ``OutputLayer``).

    ``activation`` defaults to what the loss expects: softmax for ``nll`` and
    ``cross_entropy``, sigmoid for ``bce``, identity for ``mse``/``mae``. While training,
    freezeray asks the layer for its pre-activation values (see :func:`emit_logits`) so
    that softmax + NLL is computed stably as cross-entropy on logits.

    ``weight_init`` defaults to ``"zeros"``, not DL4J's ``XAVIER``: the usual start of a
    linear classifier on fixed features (a linear probe). With random starting weights,
    early stopping leaves their noise in feature directions that training never revisits;
    on the demo's digits features a zero start reached 0.3-0.5 points more held-out
    accuracy, the same for every seed. Pass ``weight_init="xavier"`` for DL4J's behaviour.
    The gradient of a zero output layer is not zero, so layers before it still train.

    Example:
        >>> Output(5, loss="nll", activation="softmax", weight_init="xavier")
    """

    kind = "Output"
    _DEFAULT_ACTIVATION = {"nll": "softmax", "cross_entropy": "softmax", "bce": "sigmoid", "mse": "identity", "mae": "identity"}

    def __init__(
        self,
        n_out: int,
        loss: str = "nll",
        activation: str | None = None,
        weight_init: str | dict | None = "zeros",
        lr: float | None = None,
        dropout: float | None = None,
        n_in: int | None = None,
        bias: bool = True,
    ) -> None:
        loss = canonical_loss(loss)
        activation = activation if activation is not None else self._DEFAULT_ACTIVATION[loss]
        activation_fn(activation)
        if activation not in LOSSES[loss]:
            raise ValueError(
                f"Output: loss {loss!r} does not fit activation {activation!r}; "
                f"{loss} works with: {', '.join(LOSSES[loss])}"
            )
        self.loss = loss
        super().__init__(n_out, activation, weight_init, lr, dropout, n_in, bias)
        self.emit_logits = False

    def spec(self) -> dict[str, Any]:
        return {"loss": self.loss, **super().spec()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self._pre(x)
        return z if self.emit_logits else ACTIVATIONS[self.activation](z)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", loss={self.loss}"


class Convolution(Layer):
    """A 2-D convolution with its activation (DL4J's ``ConvolutionLayer``).

    Example:
        >>> Convolution(64, kernel_size=3, padding=1, activation="relu")
    """

    kind = "Convolution"

    def __init__(
        self,
        n_out: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | str = 0,
        activation: str = "relu",
        weight_init: str | dict | None = "relu",
        lr: float | None = None,
        dropout: float | None = None,
        n_in: int | None = None,
        bias: bool = True,
    ) -> None:
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        super().__init__(n_out, activation, weight_init, lr, dropout, n_in, bias)
        self.conv: nn.Conv2d | None = None
        if n_in is not None:
            self.materialize(n_in)

    def _core(self) -> nn.Module | None:
        return self.conv

    def _build(self, n_in: int) -> None:
        self.conv = nn.Conv2d(n_in, self.n_out, self.kernel_size, self.stride, self.padding, bias=self.bias,
                              device="meta").to_empty(device=torch.get_default_device())

    def spec(self) -> dict[str, Any]:
        return {"kernel_size": self.kernel_size, "stride": self.stride, "padding": self.padding, **super().spec()}

    def expects(self) -> str:
        return f"expects (N, {self.n_in}, H, W)" if self.n_in else ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.conv is not None, "materialized before the first call"
        return ACTIVATIONS[self.activation](self.conv(self._drop(x)))


LAYER_TYPES: dict[str, type[Layer]] = {"Dense": Dense, "Output": Output, "Convolution": Convolution}


@contextmanager
def emit_logits(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every :class:`Output` layer of ``model`` returns its
    pre-activation values, which the losses expect."""
    outputs = [m for m in model.modules() if isinstance(m, Output)]
    before = [m.emit_logits for m in outputs]
    for m in outputs:
        m.emit_logits = True
    try:
        yield model
    finally:
        for m, b in zip(outputs, before):
            m.emit_logits = b
