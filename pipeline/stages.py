"""Staged fine-tuning: the head first, then more of the backbone, each stage with its own
frozen set, epochs and learning rates (fastai's ``fine_tune(freeze_epochs)``, Lightning's
``BackboneFinetuning``), in one call.

A first stage whose frozen set is the one that made a feature set trains on those
features (``fit_head``: no image is decoded and the backbone never runs); the later
stages train from the images (``finetune``). Each stage starts from the previous stage's
best weights with a new optimizer for its trainable set.

BatchNorm rule: BatchNorm layers that a stage unfreezes (frozen in the model given, so
pretrained) train as PyTorch trains them, their running statistics included (fastai's
and Lightning's ``train_bn=True``). ``Stage(train_bn=False)`` keeps their statistics, as
in inference, while their scale and shift train (Keras's advice for small batches of
data close to the pretraining set). Measured on the digits (``benchmarks/staged.py``):
keeping the statistics gave 0.938 held-out accuracy, below the head alone (0.969), and
letting them train 0.987. Frozen layers never change.

Learning rates: each stage's ``lr``, ``lr_multipliers`` and ``lr_slice`` override the
settings the model holds when the stage starts (the previous stage's, first the model's
fine-tune configuration): DL4J's rule for a fine-tune configuration on a model that has
one. Mixed precision, the updater and regularisation come from that configuration.

Runs and resume: stage ``i`` of run ``NAME`` is the run ``NAME-stage<i>`` under the same
storage. Calling again with the same name finds the finished stages' final checkpoints
(their best weights, in seconds) and resumes the unfinished stage from its newest good
checkpoint.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any, Callable, Sequence

import torch.fx as fx
from pydantic import Field, PositiveInt, model_validator
from torch import nn

import surgery
from freezeray.schema import Schema
from surgery.freeze import apply_frozen_, frozen_nodes, keep_inference_mode_
from surgery.graph import ancestors_closure, resolve_many, vertex_table
from surgery.recipe import set_info_
from surgery.training.config import FineTuneConfiguration

from .train import FitResult

__all__ = ["Stage", "run_stages", "stage_model", "stage_problems"]

log = logging.getLogger(__name__)


class Stage(Schema):
    """One stage of a staged fine-tuning run.

    Example:
        >>> Stage(frozen="global_pool", features="s3://b/features/train")  # the head, on cached features
        >>> Stage(unfreeze=("blocks.6", "conv_head", "bn2"), lr=1e-4)      # then the last block, slower
        >>> Stage(frozen="blocks.4", lr_slice=(1e-5, 1e-4), epochs=3)      # then blocks 5 and 6, ramped
    """

    frozen: str | None = None  # freeze this vertex (or container) and all before it; None: the previous stage's
    unfreeze: tuple[str, ...] = ()  # vertices or containers (timm's "blocks.6") to unfreeze from the previous stage's set
    epochs: PositiveInt | None = None  # None: finetune's epochs (default: until the validation loss stops improving)
    lr: float | None = Field(default=None, ge=0.0)  # this stage's base learning rate; None: the fine-tune configuration's
    lr_multipliers: dict[str, float] = Field(default_factory=dict)  # vertex or container -> lr multiplier
    lr_slice: tuple[float, float] | None = None  # fastai's slice: a geometric ramp over the trainable blocks
    batch_size: PositiveInt | None = None  # None: finetune's batch size (fit_head's default on features)
    train_bn: bool = True  # False: BatchNorm layers this stage unfreezes keep their running statistics
    # the first stage only: a feature set (URI or FeatureSet) its frozen part made, trained on
    # with fit_head instead of images; not part of the stage's definition (the features are)
    features: Any = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _one_way(self) -> "Stage":
        if self.frozen is not None and self.unfreeze:
            raise ValueError("give either frozen (a boundary) or unfreeze (vertices), not both")
        return self

    def fine_tune(self, base: FineTuneConfiguration) -> FineTuneConfiguration:
        """``base`` with this stage's learning-rate settings (only those given) overriding it."""
        given = {k: getattr(self, k) for k in ("lr", "lr_multipliers", "lr_slice") if k in self.model_fields_set}
        return base.merged(FineTuneConfiguration(**given)) if given else base


def _batchnorms(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def stage_model(model: fx.GraphModule, stage: Stage, pretrained_bn: set[str]) -> fx.GraphModule:
    """A copy of ``model`` frozen as ``stage`` says, with its fine-tune configuration, and
    the BatchNorm layers of ``pretrained_bn`` that are now trainable kept in inference
    mode (unless ``stage.train_bn``).

    Raises:
        ValueError: a vertex that is not in the graph, or a stage that leaves nothing trainable.
    """
    m = copy.deepcopy(model)
    table = vertex_table(m)
    if stage.frozen is not None:
        members = [n for v in resolve_many(m, stage.frozen, table) for n in v.nodes]
        apply_frozen_(m, ancestors_closure(members))
    elif stage.unfreeze:
        drop = {n for name in stage.unfreeze for v in resolve_many(m, name, table) for n in v.nodes}
        apply_frozen_(m, frozen_nodes(m) - drop)
    else:
        apply_frozen_(m, frozen_nodes(m))  # as before, with no hooks left from an earlier stage
    if not any(p.requires_grad for p in m.parameters()):
        raise ValueError(f"stage {stage.to_dict()} leaves nothing trainable: everything is frozen")
    info = surgery.get_info(m)
    set_info_(m, info.with_(fine_tune=stage.fine_tune(info.fine_tune or FineTuneConfiguration())))
    if not stage.train_bn:
        keep_inference_mode_([bn for name, bn in _batchnorms(m).items()
                              if name in pretrained_bn and any(p.requires_grad for p in bn.parameters())])
    return m


def stage_problems(model: fx.GraphModule, stages: Sequence[Stage]) -> list[tuple[str, Exception]]:
    """Every vertex the stages freeze to or unfreeze that ``model`` lacks, as (path such as
    ``[1].unfreeze``, the error naming it and its closest matches)."""
    table = vertex_table(model)
    problems: list[tuple[str, Exception]] = []
    for i, stage in enumerate(stages):
        for key, names in (("frozen", [stage.frozen] if stage.frozen is not None else []), ("unfreeze", stage.unfreeze)):
            for vertex in names:
                try:
                    resolve_many(model, vertex, table)
                except Exception as exc:
                    problems.append((f"[{i}].{key}", exc))
    return problems


def run_stages(
    model: fx.GraphModule,
    stages: Sequence[Stage | dict[str, Any]],
    train_images: Callable[[fx.GraphModule, Stage, str, Callable | None], FitResult],
    *,
    run: str,
    fit_features: Callable[[fx.GraphModule, Stage, str, Callable | None], FitResult] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> FitResult:
    """Run ``stages`` one after the other (see the module's docstring); ``train_images`` and
    ``fit_features`` train one stage's model from images or, for a first stage with
    ``features``, from its feature set.

    Returns:
        the last stage's :class:`FitResult` (its model holds that stage's best weights),
        with the history of every stage (each epoch marked with its ``stage``) and the
        stages' own results in ``stages``.
    """
    started = time.perf_counter()
    plan = [s if isinstance(s, Stage) else Stage.from_dict(s) for s in stages]
    if not plan:
        raise ValueError("stages is empty: give at least one Stage (or stages=None for one run)")
    problems = stage_problems(model, plan)  # every stage's vertices are checked before the first one trains
    if problems:
        raise problems[0][1]
    pretrained_bn = {n for n, bn in _batchnorms(model).items() if not any(p.requires_grad for p in bn.parameters())}
    current, results = model, []
    for i, stage in enumerate(plan):
        m = stage_model(current, stage, pretrained_bn)
        name = f"{run}-stage{i}"
        cb = (lambda event, i=i: callback({**event, "stage": i})) if callback is not None else None
        on_features = i == 0 and stage.features is not None
        trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
        log.info("stage %d of %d (%s): %s trainable parameters, from %s", i + 1, len(plan), name, f"{trainable:,}",
                 "the feature set" if on_features else "images")
        if on_features:
            assert fit_features is not None
            result = fit_features(m, stage, name, cb)
        else:
            result = train_images(m, stage, name, cb)
        apply_frozen_(result.model, frozen_nodes(result.model))  # drops the BatchNorm hooks: a plain model again
        results.append(result)
        current = result.model
    last = results[-1]
    history = [{**h, "stage": i} for i, r in enumerate(results) for h in r.history]
    out = copy.copy(last)
    out.history, out.stages, out.run = history, results, run
    out.seconds = time.perf_counter() - started
    return out
