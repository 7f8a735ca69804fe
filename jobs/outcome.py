"""What a run produced (:class:`RunOutcome`), and the few lines the CLI prints about it.

Error rows (images that could not be read) are shown wherever a result is: their count,
the first few names with their reasons, and where the full table is
(:func:`error_groups`, used by the console lines and the report alike)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from .config import RunConfig

__all__ = ["RunOutcome", "ErrorGroup", "outcome_lines", "baseline_line", "error_groups", "error_line", "feature_errors",
           "SHOWN_ERRORS"]

SHOWN_ERRORS = 3  # error rows named on the console (the report names ten)


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
    baselines: list[Any] = field(default_factory=list)  # jobs.baselines.Baseline: pixels, random backbone


@dataclass
class ErrorGroup:
    """The error rows of one part of a run (a split's features, an evaluation or
    predictions from images)."""

    split: str  # "train", "validation", "test", "predict"
    count: int
    rows: list[tuple[str, str]]  # (path, reason); all of them when ``table`` is None, else the first few
    table: str | None  # where every error row is (a feature set or predictions folder), or None when only in memory
    read_all: Any = None  # () -> every (path, reason), when ``rows`` holds only the first few


def _first_rows(table: Any, n: int) -> list[tuple[str, str]]:
    head = table.slice(0, n)
    return list(zip(head.column("path").to_pylist(), head.column("reason").to_pylist()))


def feature_errors(fset: Any, split: str, n: int = 10) -> ErrorGroup:
    """A feature set's error rows: count, the first ``n``, and its errors table."""

    rows = _first_rows(fset.errors_table(), n) if fset.errors else []
    return ErrorGroup(split, int(fset.errors), rows, fset.uri, lambda: _first_rows(fset.errors_table(), fset.errors))


def error_groups(outcome: "RunOutcome", n: int = 10) -> list[ErrorGroup]:
    """Every group of error rows of a run, each once: the features of each split, the
    evaluation (when it read images rather than the test features) and the predictions."""

    groups = [feature_errors(f, split, n) for split, f in outcome.features.items()]
    ev = outcome.evaluation
    if ev is not None and ev.errors and not any(g.table == ev.errors_uri for g in groups):
        rows = [(r["path"], r["reason"]) for r in ev.error_examples] if ev.errors_uri else list(ev._error_rows)
        opts = outcome.config.data.storage_options or None
        groups.append(ErrorGroup("test", int(ev.errors), rows, ev.errors_uri,
                                 (lambda: _first_rows(ev.errors_table(opts), ev.errors)) if ev.errors_uri else None))
    p = outcome.predictions
    if p is not None and p.errors:
        opts = outcome.config.data.storage_options or None
        try:
            rows = _first_rows(p.errors_table(opts), n)
        except Exception:  # the table is the predictions' own; its names are a courtesy here
            rows = []
        groups.append(ErrorGroup("predict", int(p.errors), rows, p.output, lambda: _first_rows(p.errors_table(opts), p.errors)))
    return [g for g in groups if g.count]


def _reason(text: str, width: int = 60) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[:width - 3] + "..."


def error_line(group: ErrorGroup, where: str | None = None) -> str:
    """``unreadable test images: 2 (a.jpg: empty file; b.png: truncated); all in <table>``."""
    shown = "; ".join(f"{p.rsplit('/', 1)[-1]}: {_reason(r)}" for p, r in group.rows[:SHOWN_ERRORS])
    more = f"; {group.count - SHOWN_ERRORS} more" if group.count > SHOWN_ERRORS else ""
    table = where or group.table
    return (f"unreadable {group.split} images: {group.count} ({shown}{more})"
            + (f"; all in {table}" if table else ""))


def _how(fset: Any) -> str:
    return "reused the cached features" if fset.reused else f"computed, {fset.manifest.images_per_s} images/s"


def outcome_lines(outcome: RunOutcome, total_s: float) -> list[str]:
    """The facts of a run, a line each: accuracy, features, training, sweep, outputs, time."""
    lines = []
    ev = outcome.evaluation
    if ev is not None:
        lines.append(f"accuracy {ev.accuracy:.4f} on {ev.rows} test images ({ev.errors} unreadable)")
        if outcome.baselines:
            lines.append(baseline_line(ev.accuracy, outcome.baselines))
    if outcome.features:
        parts = [f"{split} {f.rows} rows{f', {f.errors} unreadable' if f.errors else ''} ({_how(f)})"
                 for split, f in outcome.features.items()]
        lines.append("features: " + "; ".join(parts))
    report_errors = f"{outcome.report_uri}/errors.parquet" if outcome.report_uri else None
    lines += [error_line(g, report_errors) for g in error_groups(outcome, SHOWN_ERRORS)]
    if outcome.sweep is not None:
        s = outcome.sweep
        lines.append(f"sweep: {len(s.table)} trials {'reused (same name and definition)' if s.reused else f'in {s.seconds:.1f}s'}"
                     f"; best {s.metric} {s.best_metrics[s.metric]:.4f} "
                     f"with {', '.join(f'{k}={_short(v)}' for k, v in s.best_config.items())}")
    if outcome.fit is not None:
        fit = outcome.fit
        where = "local mode" if fit.mode == "local" else f"{fit.workers} Ray Train worker{'s' if fit.workers != 1 else ''}"
        staged = f"{len(fit.stages)} stages, " if fit.stages else ""
        lines.append(f"training: {staged}{len(fit.history)} epochs ({where}), best epoch {fit.best_epoch}"
                     f"{' of the last stage' if staged else ''}, run {fit.run}"
                     f"{' (resumed: same name and definition)' if getattr(fit, 'resumed', False) else ''}")
    if outcome.predictions is not None:
        p = outcome.predictions
        lines.append(f"predictions: {p.rows} rows{f', {p.errors} unreadable' if p.errors else ''} -> {p.output}")
    if outcome.model_uri:
        lines.append(f"model:  {outcome.model_uri}")
    if outcome.report_uri:
        lines.append(f"report: {outcome.report_uri}/report.md")
    steps = ", ".join(f"{k} {v:.1f}s" for k, v in outcome.timings.items())
    lines.append(f"time: {steps} (total {total_s:.0f}s)")
    return lines


def baseline_line(accuracy: float, baselines: list[Any]) -> str:
    """``baselines: pixels 0.4567 (+50.7 points), random backbone 0.5833 (+38.0 points)``:
    each baseline's accuracy and how far the run's is above it."""
    parts = []
    for b in baselines:
        if b.accuracy is None:
            parts.append(f"{b.name} skipped ({b.skipped})")
            continue
        sampled = f" on {b.test_rows} of {b.of_test} test images" if b.of_test > b.test_rows else ""
        parts.append(f"{b.name} {b.accuracy:.4f} ({100 * (accuracy - b.accuracy):+.1f} points{sampled})")
    return "baselines: " + ", ".join(parts)


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
