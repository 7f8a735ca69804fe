"""What a run produced (:class:`RunOutcome`), and the few lines the CLI prints about it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from .config import RunConfig

__all__ = ["RunOutcome", "outcome_lines"]


@dataclass
class RunOutcome:
    """What a run produced, for the report and the CLI's last lines."""

    config: RunConfig
    model: fx.GraphModule | None = None
    features: dict[str, Any] = field(default_factory=dict)  # split -> pipeline.FeatureSet
    fit: Any = None  # pipeline.FitResult
    sweep: Any = None  # pipeline.SweepResult
    evaluation: Any = None  # pipeline.EvalResult
    predictions: Any = None  # pipeline.PredictResult
    timings: dict[str, float] = field(default_factory=dict)  # seconds per step
    model_uri: str | None = None
    report_uri: str | None = None


def _how(fset: Any) -> str:
    return "reused the cached features" if fset.reused else f"computed, {fset.manifest.images_per_s} images/s"


def outcome_lines(outcome: RunOutcome, total_s: float) -> list[str]:
    """The facts of a run, a line each: accuracy, features, training, sweep, outputs, time."""
    lines = []
    ev = outcome.evaluation
    if ev is not None:
        lines.append(f"accuracy {ev.accuracy:.4f} on {ev.rows} test images ({ev.errors} unreadable)")
    if outcome.features:
        parts = [f"{split} {f.rows} rows ({_how(f)})" for split, f in outcome.features.items()]
        lines.append("features: " + "; ".join(parts))
    if outcome.sweep is not None:
        s = outcome.sweep
        lines.append(f"sweep: {len(s.table)} trials in {s.seconds:.1f}s; best {s.metric} {s.best_metrics[s.metric]:.4f} "
                     f"with {', '.join(f'{k}={_short(v)}' for k, v in s.best_config.items())}")
    if outcome.fit is not None:
        fit = outcome.fit
        where = "local mode" if fit.mode == "local" else f"{fit.workers} Ray Train worker{'s' if fit.workers != 1 else ''}"
        staged = f"{len(fit.stages)} stages, " if fit.stages else ""
        lines.append(f"training: {staged}{len(fit.history)} epochs ({where}), best epoch {fit.best_epoch}"
                     f"{' of the last stage' if staged else ''}, run {fit.run}")
    if outcome.predictions is not None:
        lines.append(f"predictions: {outcome.predictions.rows} rows -> {outcome.predictions.output}")
    if outcome.model_uri:
        lines.append(f"model:  {outcome.model_uri}")
    if outcome.report_uri:
        lines.append(f"report: {outcome.report_uri}/report.md")
    steps = ", ".join(f"{k} {v:.1f}s" for k, v in outcome.timings.items())
    lines.append(f"time: {steps} (total {total_s:.0f}s)")
    return lines


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
