"""DL4J's ``FineTuneConfiguration``: how the trainable part of a model is trained.

It applies to trainable layers only (frozen parameters get no optimizer state, no weight
decay and no L1/L2), and settings given on a layer (``lr``, ``dropout``) win. Every
trainer in freezeray builds its optimizer, schedule and penalties from here, so the
helper, Ray Train and a hand-written loop all do the same thing.

Updaters (DL4J's names are accepted too, in any case) and the defaults of the settings
left out, which are DL4J's own:

============  ======================  =============================================
updater       DL4J                    torch optimizer and defaults
============  ======================  =============================================
``sgd``       ``Sgd``                 ``SGD``, lr 1e-3, no momentum (unless given)
``nesterov``  ``Nesterovs``           ``SGD(nesterov=True)``, lr 0.1, momentum 0.9
``adam``      ``Adam``                ``Adam``, lr 1e-3, betas (0.9, 0.999), eps 1e-8
``adamw``     (torch)                 ``AdamW``, lr 1e-3 (decoupled ``weight_decay``)
``adamax``    ``AdaMax``              ``Adamax``, lr 1e-3
``nadam``     ``Nadam``               ``NAdam``, lr 1e-3
``amsgrad``   ``AMSGrad``             ``Adam(amsgrad=True)``, lr 1e-3
``adagrad``   ``AdaGrad``             ``Adagrad``, lr 0.1, eps 1e-6
``adadelta``  ``AdaDelta``            ``Adadelta``, lr 1.0, rho (``decay``) 0.95, eps 1e-6
``rmsprop``   ``RmsProp``             ``RMSprop``, lr 0.1, alpha (``decay``) 0.95, eps 1e-8, no momentum
``noop``      ``NoOp``                no update at all (``SGD`` with lr 0)
============  ======================  =============================================

The default updater is Adam with lr 1e-3 (Keras's default, and what converged best for
linear heads on frozen features in our measurements; see the README).

``dropout`` is a drop *probability* (torch's and Keras's meaning). DL4J's ``dropOut(x)``
takes the probability of *retaining* an activation: DL4J's ``dropOut(0.8)`` is
``dropout=0.2`` here.

Given to ``TransferLearning.fine_tune_configuration`` on a model that already has a
configuration, only the settings given override it (DL4J's semantics): the object
remembers which settings its author chose (``to_dict`` holds just those). The updater is
one object in DL4J (``new RmsProp(0.2)``), so a configuration that names an ``updater``
replaces the old updater whole: its hyper-parameters (:data:`UPDATER_SETTINGS`: ``lr``,
``momentum``, ``decay``, ``eps``, ``betas``) are the new configuration's or the new
updater's defaults, never the old updater's. Settings that are not the updater's
(``l1``, ``l2``, ``weight_decay``, ``dropout``, ``seed``, schedules, ``lr_multipliers``,
``loss_weights``, a layer's own ``lr``) still merge.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from freezeray.schema import Schema

__all__ = ["FineTuneConfiguration", "UPDATERS", "SCHEDULES", "UPDATER_DEFAULTS", "UPDATER_SETTINGS"]

Schedule = Literal["constant", "step", "exponential", "cosine"]
SCHEDULES = ("constant", "step", "exponential", "cosine")
UPDATERS = ("sgd", "nesterov", "adam", "adamw", "adamax", "nadam", "amsgrad", "adagrad", "adadelta", "rmsprop", "noop")
Updater = Literal["sgd", "nesterov", "adam", "adamw", "adamax", "nadam", "amsgrad", "adagrad", "adadelta", "rmsprop", "noop"]
_ALIASES = {"nesterovs": "nesterov", "none": "noop"}  # DL4J's names that differ from ours, lower-cased

# the updater's own hyper-parameters: a configuration naming an updater replaces them all
UPDATER_SETTINGS = ("lr", "momentum", "decay", "eps", "betas")

# settings an updater uses when they are not given (DL4J's defaults)
UPDATER_DEFAULTS: dict[str, dict[str, float]] = {
    "sgd": {"lr": 1e-3, "momentum": 0.0},
    "nesterov": {"lr": 0.1, "momentum": 0.9},
    "adam": {"lr": 1e-3, "eps": 1e-8},
    "adamw": {"lr": 1e-3, "eps": 1e-8},
    "adamax": {"lr": 1e-3, "eps": 1e-8},
    "nadam": {"lr": 1e-3, "eps": 1e-8},
    "amsgrad": {"lr": 1e-3, "eps": 1e-8},
    "adagrad": {"lr": 0.1, "eps": 1e-6},
    "adadelta": {"lr": 1.0, "decay": 0.95, "eps": 1e-6},
    "rmsprop": {"lr": 0.1, "decay": 0.95, "eps": 1e-8, "momentum": 0.0},
    "noop": {"lr": 0.0},
}

class FineTuneConfiguration(Schema):
    """Optimizer, regularisation and schedule for the trainable part of a model.

    Example:
        >>> FineTuneConfiguration(updater="nesterov", lr=5e-5, momentum=0.9, seed=123)
        >>> FineTuneConfiguration(updater="RmsProp")          # DL4J's RmsProp: lr 0.1, decay 0.95
        >>> FineTuneConfiguration(lr=1e-3, lr_multipliers={"blocks.5": 0.1, "blocks.6": 0.3})
    """

    updater: Updater = "adam"  # see the table above; DL4J's names accepted
    lr: float | None = Field(default=None, ge=0.0)  # base learning rate; None: the updater's default; a layer's own lr wins
    momentum: float | None = Field(default=None, ge=0.0, lt=1.0)  # sgd/nesterov/rmsprop momentum; None: the updater's default
    decay: float | None = Field(default=None, gt=0.0, lt=1.0)  # rmsprop's decay (torch's alpha), adadelta's rho
    weight_decay: float = Field(default=0.0, ge=0.0)  # torch's weight decay (decoupled for adamw); never on biases or norms
    l1: float = Field(default=0.0, ge=0.0)  # DL4J's l1: l1 * sum|w| added to the loss over trainable weights
    l2: float = Field(default=0.0, ge=0.0)  # DL4J's l2: l2/2 * sum w^2 added to the loss over trainable weights
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)  # drop probability of trainable freezeray layers' inputs (DL4J's dropOut(p) is 1 - p)
    seed: int | None = None  # seeds new layers' weights and the training order; None: not seeded
    betas: tuple[float, float] = (0.9, 0.999)  # adam-family moment decay rates
    eps: float | None = Field(default=None, gt=0.0)  # epsilon; None: the updater's default
    gradient_clip: float | None = Field(default=None, ge=0.0)  # clip threshold; None: no clipping
    gradient_clip_mode: Literal["norm", "value"] = "norm"  # clip the global norm or each value
    schedule: Schedule = "constant"  # learning-rate schedule, stepped once per epoch
    schedule_gamma: float = Field(default=0.1, ge=0.0, le=1.0)  # decay factor for step and exponential schedules
    schedule_step: int = Field(default=10, gt=0)  # epochs between step decays
    warmup_epochs: int = Field(default=0, ge=0)  # linear warm-up epochs before the schedule
    lr_multipliers: dict[str, float] = Field(default_factory=dict)  # vertex or container -> lr multiplier (longest name wins)
    lr_slice: tuple[float, float] | None = None  # fastai's discriminative slice: lr from the first trainable block to the last
    mixed_precision: bool | Literal["bf16", "fp16"] = False  # autocast while training (see surgery.training.precision)
    loss_weights: dict[str, float] = Field(default_factory=dict)  # output vertex -> weight of its loss in the sum (default 1)

    @field_validator("updater", mode="before")
    @classmethod
    def _updater_name(cls, v: Any) -> Any:
        if isinstance(v, str):
            name = v.strip().lower()
            name = _ALIASES.get(name, name)
            if name not in UPDATERS:
                raise ValueError(f"must be one of {', '.join(UPDATERS)} (or DL4J's names: Sgd, Nesterovs, Adam, "
                                 f"AdaMax, Nadam, AMSGrad, AdaGrad, AdaDelta, RmsProp, NoOp), got {v!r}")
            return name
        return v

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"betas must be two numbers in [0, 1), got {v!r}")
        return v

    @field_validator("lr_multipliers")
    @classmethod
    def _multipliers(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: m for k, m in v.items() if not isinstance(m, (int, float)) or m < 0}
        if bad:
            raise ValueError(f"lr_multipliers must map vertex names to non-negative numbers, got {bad}")
        return v

    @field_validator("loss_weights")
    @classmethod
    def _loss_weights(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: w for k, w in v.items() if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0}
        if bad:
            raise ValueError(f"loss_weights must map output vertices to non-negative numbers, got {bad}")
        return v

    def merged(self, other: "FineTuneConfiguration") -> "FineTuneConfiguration":
        """These settings with those given in ``other`` overriding them; an ``updater``
        given in ``other`` replaces this one's whole (see the module docstring).

        Example:
            >>> old = FineTuneConfiguration(updater="nesterov", lr=0.01, momentum=0.99)
            >>> old.merged(FineTuneConfiguration(updater="rmsprop", lr=0.2)).momentum is None  # RmsProp's default
            True
        """
        mine = self.to_dict()
        theirs = other.to_dict()
        if "updater" in theirs:
            mine = {k: v for k, v in mine.items() if k not in UPDATER_SETTINGS}
        return type(self).from_dict({**mine, **theirs})

    @model_validator(mode="after")
    def _slice(self) -> "FineTuneConfiguration":
        if self.lr_slice is not None and not (0 < self.lr_slice[0] and 0 < self.lr_slice[1]):
            raise ValueError(f"lr_slice must be two positive learning rates (first block, last block), got {self.lr_slice}")
        return self

    # -- resolved settings ---------------------------------------------------------------
    def setting(self, name: str) -> float:
        """``lr``, ``momentum``, ``decay`` or ``eps`` as the updater uses it: given, else its default."""
        value = getattr(self, name)
        if value is not None:
            return float(value)
        return float(UPDATER_DEFAULTS[self.updater].get(name, {"momentum": 0.0, "decay": 0.95, "eps": 1e-8}.get(name, 0.0)))

    # -- what trainers use ---------------------------------------------------------------
    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Trainable parameters grouped by learning rate and weight decay.

        Frozen parameters (``requires_grad=False``) are left out, so they get no optimizer
        state and no decay. Learning rates, most specific first: a freezeray layer's own
        ``lr``; ``lr_multipliers`` (the longest vertex or container name that contains the
        parameter) times the base lr; ``lr_slice`` (a geometric ramp over the trainable
        blocks, see :func:`blocks`); the base ``lr``. As in timm, biases and normalisation
        parameters (1-D tensors) get no weight decay.
        """
        from ..layers import Layer

        base = self.setting("lr")
        layer_lr: dict[int, float] = {}
        for module in model.modules():
            if isinstance(module, Layer) and module.lr is not None:
                for p in module.parameters():
                    layer_lr[id(p)] = module.lr
        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        slice_lr: dict[str, float] = {}
        if self.lr_slice is not None:
            order = blocks(model, trainable)
            lo, hi = self.lr_slice
            for i, block in enumerate(order):
                t = i / (len(order) - 1) if len(order) > 1 else 1.0
                slice_lr[block] = lo * (hi / lo) ** t
        prefixes = sorted(self.lr_multipliers, key=len, reverse=True)
        groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
        seen: set[int] = set()
        for name, p in trainable:
            if id(p) in seen:
                continue
            seen.add(id(p))
            if id(p) in layer_lr:
                lr = layer_lr[id(p)]
            else:
                prefix = next((k for k in prefixes if name == k or name.startswith(k + ".")), None)
                if prefix is not None:
                    lr = base * self.lr_multipliers[prefix]
                elif slice_lr:
                    lr = slice_lr[_block_of(name, slice_lr)]
                else:
                    lr = base
            decay = self.weight_decay if p.dim() > 1 else 0.0
            groups.setdefault((lr, decay), []).append(p)
        return [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The ``torch.optim`` optimizer for ``model``'s trainable parameters (see the table).

        Raises:
            ValueError: when ``model`` has nothing to train.
        """
        groups = self.param_groups(model)
        if not groups:
            raise ValueError("the model has no trainable parameters: everything is frozen")
        u, lr, eps = self.updater, self.setting("lr"), self.setting("eps")
        if u in ("sgd", "nesterov", "noop"):
            momentum = 0.0 if u == "noop" else self.setting("momentum")
            if u == "noop":
                for g in groups:
                    g["lr"] = 0.0
            return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=u == "nesterov" and momentum > 0)
        if u in ("adam", "amsgrad"):
            return torch.optim.Adam(groups, lr=lr, betas=self.betas, eps=eps, amsgrad=u == "amsgrad")
        if u == "adamw":
            return torch.optim.AdamW(groups, lr=lr, betas=self.betas, eps=eps)
        if u == "adamax":
            return torch.optim.Adamax(groups, lr=lr, betas=self.betas, eps=eps)
        if u == "nadam":
            return torch.optim.NAdam(groups, lr=lr, betas=self.betas, eps=eps)
        if u == "adagrad":
            return torch.optim.Adagrad(groups, lr=lr, eps=eps)
        if u == "adadelta":
            return torch.optim.Adadelta(groups, lr=lr, rho=self.setting("decay"), eps=eps)
        return torch.optim.RMSprop(groups, lr=lr, alpha=self.setting("decay"), eps=eps, momentum=self.setting("momentum"))

    def build_scheduler(self, optimizer: torch.optim.Optimizer, epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
        """The learning-rate schedule, stepped once per epoch (after the epoch); ``epochs``
        is the length of a cosine schedule."""
        warm, gamma, step = self.warmup_epochs, self.schedule_gamma, self.schedule_step
        total = max(1, epochs - warm)

        def factor(epoch: int) -> float:
            if epoch < warm:
                return (epoch + 1) / (warm + 1)
            e = epoch - warm
            if self.schedule == "step":
                return gamma ** (e // step)
            if self.schedule == "exponential":
                return gamma ** e
            if self.schedule == "cosine":
                return 0.5 * (1.0 + math.cos(math.pi * min(e, total) / total))
            return 1.0

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        """DL4J's L1/L2 terms over trainable weights (not biases or norms), or None."""
        if not (self.l1 or self.l2):
            return None
        total: Any = None
        for p in model.parameters():
            if p.requires_grad and p.dim() > 1:
                term: Any = 0.0
                if self.l1:
                    term = term + self.l1 * p.abs().sum()
                if self.l2:
                    term = term + 0.5 * self.l2 * p.pow(2).sum()
                total = term if total is None else total + term
        return total

    def clip_gradients_(self, model: nn.Module) -> None:
        """Clip the gradients of trainable parameters. This is done in place."""
        if self.gradient_clip is None:
            return
        params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
        if self.gradient_clip_mode == "norm":
            torch.nn.utils.clip_grad_norm_(params, self.gradient_clip)
        else:
            torch.nn.utils.clip_grad_value_(params, self.gradient_clip)


def _block_of(name: str, known: dict[str, float]) -> str:
    return max((b for b in known if name == b or name.startswith(b + ".")), key=len)


def blocks(model: nn.Module, parameters: list[tuple[str, nn.Parameter]] | None = None) -> list[str]:
    """The blocks of ``model`` that hold the given (default: trainable) parameters, in
    definition order: its top-level children, with ``nn.Sequential``/``nn.ModuleList``
    children (timm's ``blocks``, torchvision's ``features`` and ``layer4``) split into their
    items. ``lr_slice`` ramps over these."""
    containers = {name for name, m in model.named_children() if isinstance(m, (nn.Sequential, nn.ModuleList))}
    if parameters is None:
        parameters = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    out: list[str] = []
    for name, _ in parameters:
        parts = name.split(".")
        block = ".".join(parts[:2]) if parts[0] in containers and len(parts) > 2 else parts[0]
        if block not in out:
            out.append(block)
    return out
