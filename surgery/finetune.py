"""DL4J's ``FineTuneConfiguration``: how the trainable part of a model is trained.

It applies to trainable layers only (frozen parameters get no optimizer state, no weight
decay and no L1/L2), and settings given on a layer (``lr``, ``dropout``) win. Every
trainer in freezeray builds its optimizer, schedule and penalties from here, so the
helper, Ray Train and a hand-written loop all do the same thing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import torch
from torch import nn

__all__ = ["FineTuneConfiguration", "UPDATERS", "SCHEDULES"]

Updater = Literal["sgd", "nesterov", "adam", "adamw", "rmsprop"]
Schedule = Literal["constant", "step", "exponential", "cosine"]
UPDATERS = ("sgd", "nesterov", "adam", "adamw", "rmsprop")
SCHEDULES = ("constant", "step", "exponential", "cosine")


@dataclass(frozen=True)
class FineTuneConfiguration:
    """Optimizer, regularisation and schedule for the trainable part of a model.

    Example:
        >>> FineTuneConfiguration(updater="nesterov", lr=5e-5, momentum=0.9, seed=123)
    """

    updater: Updater = "nesterov"  # DL4J's Updater: sgd, nesterov, adam, adamw or rmsprop
    lr: float = 1e-3  # base learning rate; a layer's own lr wins
    momentum: float = 0.9  # momentum for sgd/nesterov/rmsprop
    weight_decay: float = 0.0  # torch's weight decay (decoupled for adamw); never on biases or norms
    l1: float = 0.0  # DL4J's l1: l1 * sum|w| added to the loss over trainable weights
    l2: float = 0.0  # DL4J's l2: l2/2 * sum w^2 added to the loss over trainable weights
    dropout: float = 0.0  # input dropout of trainable freezeray layers that set none themselves
    seed: int | None = None  # seeds new layers' weights and the training order; None: not seeded
    betas: tuple[float, float] = (0.9, 0.999)  # adam/adamw moment decay rates
    eps: float = 1e-8  # adam/adamw/rmsprop epsilon
    gradient_clip: float | None = None  # clip threshold; None: no clipping
    gradient_clip_mode: Literal["norm", "value"] = "norm"  # clip the global norm or each value
    schedule: Schedule = "constant"  # learning-rate schedule, stepped once per epoch
    schedule_gamma: float = 0.1  # decay factor for step and exponential schedules
    schedule_step: int = 10  # epochs between step decays
    warmup_epochs: int = 0  # linear warm-up epochs before the schedule

    def __post_init__(self) -> None:
        problems = []

        def number(name: str, low: float = 0.0, high: float = math.inf, allow_high: bool = True) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (low <= v <= high) or (not allow_high and v == high):
                problems.append(f"{name} must be a number in [{low}, {high}{']' if allow_high else ')'}, got {v!r}")

        if self.updater not in UPDATERS:
            problems.append(f"updater must be one of {', '.join(UPDATERS)}, got {self.updater!r}")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.gradient_clip_mode not in ("norm", "value"):
            problems.append(f"gradient_clip_mode must be 'norm' or 'value', got {self.gradient_clip_mode!r}")
        number("lr")
        number("momentum", 0.0, 1.0, allow_high=False)
        for name in ("weight_decay", "l1", "l2", "eps"):
            number(name)
        number("dropout", 0.0, 1.0, allow_high=False)
        number("schedule_gamma", 0.0, 1.0)
        if self.gradient_clip is not None:
            number("gradient_clip")
        if not (isinstance(self.schedule_step, int) and self.schedule_step > 0):
            problems.append(f"schedule_step must be a positive integer, got {self.schedule_step!r}")
        if not (isinstance(self.warmup_epochs, int) and self.warmup_epochs >= 0):
            problems.append(f"warmup_epochs must be a non-negative integer, got {self.warmup_epochs!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            problems.append(f"seed must be an integer or None, got {self.seed!r}")
        if len(tuple(self.betas)) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            problems.append(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if problems:
            raise ValueError("invalid FineTuneConfiguration: " + "; ".join(problems))
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))

    # -- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FineTuneConfiguration":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown fine-tune settings {sorted(unknown)}; valid settings: {sorted(known)}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)

    # -- what trainers use ---------------------------------------------------------------
    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Trainable parameters grouped by learning rate and weight decay.

        Frozen parameters (``requires_grad=False``) are left out, so they get no optimizer
        state and no decay. A freezeray layer's own ``lr`` wins over ``self.lr``. As in timm,
        biases and normalisation parameters (1-D tensors) get no weight decay.
        """
        from .layers import Layer

        layer_lr: dict[int, float] = {}
        for module in model.modules():
            if isinstance(module, Layer) and module.lr is not None:
                for p in module.parameters():
                    layer_lr[id(p)] = module.lr
        groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
        seen: set[int] = set()
        for _, p in model.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            decay = self.weight_decay if p.dim() > 1 else 0.0
            groups.setdefault((layer_lr.get(id(p), self.lr), decay), []).append(p)
        return [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The ``torch.optim`` optimizer for ``model``'s trainable parameters.

        Raises:
            ValueError: when ``model`` has nothing to train.
        """
        groups = self.param_groups(model)
        if not groups:
            raise ValueError("the model has no trainable parameters: everything is frozen")
        if self.updater in ("sgd", "nesterov"):
            momentum = self.momentum
            return torch.optim.SGD(groups, lr=self.lr, momentum=momentum, nesterov=self.updater == "nesterov" and momentum > 0)
        if self.updater == "adam":
            return torch.optim.Adam(groups, lr=self.lr, betas=self.betas, eps=self.eps)
        if self.updater == "adamw":
            return torch.optim.AdamW(groups, lr=self.lr, betas=self.betas, eps=self.eps)
        return torch.optim.RMSprop(groups, lr=self.lr, momentum=self.momentum, eps=self.eps)

    def build_scheduler(self, optimizer: torch.optim.Optimizer, epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
        """The learning-rate schedule, stepped once per epoch (after the epoch)."""
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
        total = None
        for p in model.parameters():
            if p.requires_grad and p.dim() > 1:
                term = 0.0
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
