"""The run report: a folder with the resolved config (secrets left unresolved), the
result beside its baselines (the page's first table and ``baselines.png``: a linear model
on downsampled pixels and the same head on a random backbone, see :mod:`jobs.baselines`),
the model summary, per-epoch metrics, the evaluation, timings and throughput, the training curves
and confusion matrix as PNG, the trials of a sweep (a table and a plot), the images that
could not be read (``errors.parquet``: split, path, reason; their count and first names
in ``metrics.json`` and on the page), and a Markdown page that shows them.

Figures are drawn with matplotlib's object-oriented API (``matplotlib.figure.Figure`` and
its Agg canvas), so writing a report never switches the process's backend (a notebook
keeps its own)."""

from __future__ import annotations

import io
import json
from typing import Any

import yaml

import surgery
from freezeray import storage

from .outcome import RunOutcome, error_groups

__all__ = ["write_report", "curves_png", "confusion_png", "sweep_png", "baselines_png", "result_rows"]


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _png(fig: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _output_names(history: list[dict[str, Any]]) -> list[str]:
    """The outputs of a model with several, from the ``<vertex>_accuracy`` keys of its history."""
    if not history:
        return []
    return [k[:-len("_accuracy")] for k in history[0] if k.endswith("_accuracy") and not k.startswith("val_")
            and k != "accuracy" and f"{k[:-len('_accuracy')]}_loss" in history[0]]


def curves_png(history: list[dict[str, Any]]) -> bytes:
    """Loss and accuracy per epoch (train, and validation when present); for a model with
    several outputs, each output's accuracy too (dashed)."""
    epochs = [h["epoch"] + 1 for h in history]
    fig = _figure(9, 3.4)
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(epochs, [h["loss"] for h in history], marker="o", label="train")
    ax_acc.plot(epochs, [h["accuracy"] for h in history], marker="o", label="train")
    if history and "val_loss" in history[0]:
        ax_loss.plot(epochs, [h["val_loss"] for h in history], marker="s", label="validation")
        ax_acc.plot(epochs, [h["val_accuracy"] for h in history], marker="s", label="validation")
    for vertex in _output_names(history):
        key = f"val_{vertex}_accuracy" if f"val_{vertex}_accuracy" in history[0] else f"{vertex}_accuracy"
        ax_acc.plot(epochs, [h[key] for h in history], ls="--", label=key)
    for ax, title in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    return _png(fig)


def confusion_png(confusion: list[list[int]], classes: list[str]) -> bytes:
    import numpy as np

    m = np.asarray(confusion)
    size = max(3.5, 0.45 * len(classes) + 1.5)
    fig = _figure(size, size)
    ax = fig.subplots()
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if m[i, j]:
                ax.text(j, i, str(m[i, j]), ha="center", va="center",
                        color="white" if m[i, j] > m.max() / 2 else "black", fontsize=8)
    ax.set_title("confusion matrix")
    return _png(fig)


def sweep_png(curves: dict[str, list[dict[str, Any]]], metric: str, best: str | None) -> bytes:
    """``metric`` per epoch for every trial of a sweep, the best one drawn bold."""
    fig = _figure(6.5, 3.6)
    ax = fig.subplots()
    for trial, records in curves.items():
        xs = [r["epoch"] + 1 for r in records if metric in r]
        ys = [r[metric] for r in records if metric in r]
        ax.plot(xs, ys, lw=2.2 if trial == best else 0.9, alpha=1.0 if trial == best else 0.55,
                label=f"best ({trial})" if trial == best else None)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"{len(curves)} trials")
    ax.grid(alpha=0.3)
    if best is not None:
        ax.legend()
    return _png(fig)


def result_rows(outcome: RunOutcome) -> list[dict[str, Any]]:
    """The page's first table: the run's test accuracy, then each baseline's, with how
    far the run's is above it (``lead``, in points) and what it was trained on."""
    ev, cfg = outcome.evaluation, outcome.config
    if ev is None:
        return []
    base = cfg.model.base or f"the saved model {cfg.model.load}"
    weights = f", {cfg.model.weights} weights" if cfg.model.weights else ""
    how = "fine-tuned" if cfg.training.mode == "finetune" else "head on its features"
    train = outcome.features.get("train")
    rows = [{"model": f"this run: {base}{weights}, {how}", "accuracy": ev.accuracy, "lead": None, "test_rows": ev.rows,
             "note": f"{train.rows} train images" if train is not None else ""}]
    for b in outcome.baselines:
        note = b.skipped or (f"a sample: {b.train_rows} train, {b.test_rows} of {b.of_test} test images"
                             if b.of_test > b.test_rows else f"{b.train_rows} train images")
        rows.append({"model": f"baseline: {b.what}", "accuracy": b.accuracy, "test_rows": b.test_rows,
                     "lead": None if b.accuracy is None else 100 * (ev.accuracy - b.accuracy), "note": note})
    return rows


def baselines_png(rows: list[dict[str, Any]]) -> bytes:
    """Test accuracy of the run and of each baseline, as horizontal bars."""
    shown = [r for r in rows if r["accuracy"] is not None]
    fig = _figure(7.5, 0.55 * len(shown) + 1.0)
    ax = fig.subplots()
    labels = [r["model"].split(": ", 1)[-1] for r in shown]
    values = [r["accuracy"] for r in shown]
    bars = ax.barh(range(len(shown)), values, color=["tab:blue"] + ["tab:gray"] * (len(shown) - 1))
    ax.set_yticks(range(len(shown)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.08)
    ax.set_xlabel("test accuracy")
    for bar, value in zip(bars, values):
        ax.text(value + 0.01, bar.get_y() + bar.get_height() / 2, f"{value:.3f}", va="center", fontsize=8)
    ax.set_title("the run against its baselines")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def _keep_references(original: Any, redacted: Any) -> Any:
    """``redacted``, except that ``${VAR}`` references (which hold no secret) stay as written."""
    if isinstance(original, dict):
        return {k: _keep_references(v, redacted[k]) for k, v in original.items()}
    if isinstance(original, str) and "${" in original:
        return original
    return redacted


def _redacted_config(outcome: RunOutcome) -> dict[str, Any]:
    """The config as written: ${VAR} references stay references; literal secrets are masked."""
    raw = json.loads(json.dumps(outcome.config.raw, default=str))
    data = raw.get("data") or {}
    if isinstance(data.get("storage_options"), dict):
        data["storage_options"] = _keep_references(data["storage_options"], storage.redact(data["storage_options"]))
    return raw


def write_report(uri: str, outcome: RunOutcome, storage_options: dict | None = None) -> str:
    """Write the report folder under ``uri`` and return the page's URI."""
    files: dict[str, bytes] = {}
    rows = result_rows(outcome)
    if len(rows) > 1:
        files["baselines.png"] = baselines_png(rows)
    files["config.yaml"] = yaml.safe_dump(_redacted_config(outcome), sort_keys=False).encode()
    if outcome.model is not None:
        files["summary.txt"] = str(surgery.summary(outcome.model)).encode()
    metrics: dict[str, Any] = {"name": outcome.config.name, "timings_s": {k: round(v, 3) for k, v in outcome.timings.items()}}
    throughput: dict[str, Any] = {}
    for split, fset in outcome.features.items():
        throughput[f"featurize_{split}"] = {
            "rows": fset.rows, "errors": fset.errors, "reused": fset.reused,
            "images_per_s": None if fset.reused else fset.manifest.images_per_s,
            "seconds": fset.manifest.seconds,
        }
    if outcome.fit is not None:
        metrics["history"] = outcome.fit.history
        metrics["run"] = {"name": outcome.fit.run, "checkpoint": outcome.fit.checkpoint, "mode": outcome.fit.mode,
                          "workers": outcome.fit.workers, "best_epoch": outcome.fit.best_epoch}
        throughput["train_rows_per_s"] = outcome.fit.rows_per_s
        files["curves.png"] = curves_png(outcome.fit.history)
    if outcome.sweep is not None:
        sw = outcome.sweep
        files["sweep.csv"] = sw.table.to_csv(index=False).encode()
        best_trial = sw.table.iloc[0]["trial"] if len(sw.table) else None
        files["sweep.png"] = sweep_png(sw.curves, sw.metric, best_trial)
        metrics["sweep"] = {"trials": len(sw.table), "metric": sw.metric, "mode": sw.mode, "seconds": sw.seconds,
                            "best_config": sw.best_config, "best": sw.best_metrics}
    metrics["throughput"] = throughput
    if outcome.baselines:
        metrics["baselines"] = [b.to_dict() for b in outcome.baselines]
    if outcome.evaluation is not None:
        ev = outcome.evaluation
        files["evaluation.json"] = json.dumps(ev.to_dict(), indent=2).encode()
        files["confusion.png"] = confusion_png(ev.confusion, list(ev.classes))
        metrics["evaluation"] = {"accuracy": ev.accuracy, "loss": ev.loss, "macro_f1": ev.macro_f1, "rows": ev.rows,
                                 "errors": ev.errors}
        if ev.outputs:  # a model with several outputs: each one's metrics
            metrics["evaluation"]["outputs"] = {v: {k: m[k] for k in ("accuracy", "loss", "macro_f1", "weight")}
                                                for v, m in ev.outputs.items()}
    if outcome.predictions is not None:
        metrics["predictions"] = {"output": outcome.predictions.output, "rows": outcome.predictions.rows,
                                  "errors": outcome.predictions.errors}
    groups = error_groups(outcome)
    if groups:
        files["errors.parquet"] = _errors_table(groups, storage_options)
        metrics["errors"] = {g.split: {"count": g.count, "first": [{"path": p, "reason": r} for p, r in g.rows[:10]],
                                       "table": storage.join(uri, "errors.parquet"), "source_table": g.table}
                             for g in groups}
    files["metrics.json"] = json.dumps(metrics, indent=2, default=str).encode()
    files["report.md"] = _page(outcome, metrics, files).encode()
    for name, data in files.items():
        storage.write_bytes(storage.join(uri, name), data, storage_options)
    return storage.join(uri, "report.md")


def _errors_table(groups: list, storage_options: dict | None) -> bytes:
    """Every error row of the run as Parquet: split, path, reason."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    splits, paths, reasons = [], [], []
    for g in groups:
        rows = g.read_all() if g.read_all is not None else g.rows  # the group may hold only the first few
        splits += [g.split] * len(rows)
        paths += [p for p, _ in rows]
        reasons += [r for _, r in rows]
    buf = io.BytesIO()
    pq.write_table(pa.table({"split": pa.array(splits, pa.string()), "path": pa.array(paths, pa.string()),
                             "reason": pa.array(reasons, pa.string())}), buf)
    return buf.getvalue()


def _page(outcome: RunOutcome, metrics: dict[str, Any], files: dict[str, bytes]) -> str:
    cfg = outcome.config
    lines = [f"# freezeray run: {cfg.name}", ""]
    base = cfg.model.base or cfg.model.load
    lines += [f"- model: `{base}` (weights: `{cfg.model.weights}`), training mode: {cfg.training.mode}",
              "- config: [config.yaml](config.yaml); model summary: [summary.txt](summary.txt)"]
    if outcome.model_uri:
        lines.append(f"- saved model: `{outcome.model_uri}`")
    lines += _result_table(outcome)
    ev = outcome.evaluation
    if ev is not None:
        lines += ["", "## Evaluation", "", f"accuracy **{ev.accuracy:.4f}**, loss {ev.loss:.4f}, macro F1 {ev.macro_f1:.4f} "
                  f"on {ev.rows} rows ({ev.errors} unreadable)", "",
                  "| class | precision | recall | F1 | support |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {c['class']} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | {c['support']} |" for c in ev.per_class]
        if ev.outputs:
            lines += ["", f"The model has {len(ev.outputs)} outputs, each scored against the labels; the loss above is their "
                      "weighted sum, the other metrics are the first output's.", "",
                      "| output | weight | accuracy | loss | macro F1 |", "| --- | --- | --- | --- | --- |"]
            lines += [f"| {v} | {m['weight']:g} | {m['accuracy']:.4f} | {m['loss']:.4f} | {m['macro_f1']:.4f} |"
                      for v, m in ev.outputs.items()]
        if "confusion.png" in files:
            lines += ["", "![confusion matrix](confusion.png)"]
    if metrics.get("errors"):
        total = sum(e["count"] for e in metrics["errors"].values())
        per_split = ", ".join(f"{split} {e['count']}" for split, e in metrics["errors"].items())
        lines += ["", "## Unreadable images", "",
                  f"{total} image{'s' if total != 1 else ''} could not be read and were left out "
                  f"({per_split}); every one, with "
                  "its reason, is in [errors.parquet](errors.parquet).", "", "| split | file | reason |",
                  "| --- | --- | --- |"]
        lines += [f"| {split} | `{row['path']}` | {_cell(row['reason'])} |"
                  for split, e in metrics["errors"].items() for row in e["first"]]
    if outcome.fit is not None:
        lines += ["", "## Training", "", "![training curves](curves.png)", "",
                  "| epoch | loss | accuracy | val loss | val accuracy | lr |", "| --- | --- | --- | --- | --- | --- |"]
        for h in outcome.fit.history:
            lines.append(f"| {h['epoch'] + 1} | {h['loss']:.4f} | {h['accuracy']:.4f} | {h.get('val_loss', float('nan')):.4f} "
                         f"| {h.get('val_accuracy', float('nan')):.4f} | {h['lr']:.2e} |")
    if outcome.sweep is not None:
        sw = outcome.sweep
        shown = [c for c in sw.table.columns if c != "trial"]
        lines += ["", "## Sweep", "", f"{len(sw.table)} trials on the cached features in {sw.seconds:.1f}s, ranked by "
                  f"{sw.metric} ({sw.mode}); the model is the best trial's best epoch. All trials: "
                  "[sweep.csv](sweep.csv).", "", "![trials](sweep.png)", "",
                  "| trial | " + " | ".join(shown) + " |", "|" + " --- |" * (len(shown) + 1)]
        for row in sw.table.head(20).to_dict("records"):
            lines.append(f"| {row['trial']} | " + " | ".join(_cell(row[c]) for c in shown) + " |")
    lines += ["", "## Timings and throughput", "", "| step | seconds |", "| --- | --- |"]
    lines += [f"| {k} | {v:.1f} |" for k, v in outcome.timings.items()]
    for key, value in metrics.get("throughput", {}).items():
        if isinstance(value, dict):
            rate = "reused (cached)" if value.get("reused") else f"{value.get('images_per_s')} images/s"
            lines.append(f"- {key}: {value['rows']} rows, {value['errors']} errors, {rate}")
        elif value is not None:
            lines.append(f"- {key}: {value:.0f}")
    return "\n".join(lines) + "\n"


def _result_table(outcome: RunOutcome) -> list[str]:
    rows = result_rows(outcome)
    if not rows:
        return []
    lines = ["", "## Result and baselines", "", "| model | test accuracy | this run's lead | trained on |",
             "| --- | --- | --- | --- |"]
    for i, r in enumerate(rows):
        acc = "—" if r["accuracy"] is None else (f"**{r['accuracy']:.4f}**" if i == 0 else f"{r['accuracy']:.4f}")
        lead = "" if r["lead"] is None else f"{r['lead']:+.1f} points"
        lines.append(f"| {r['model']} | {acc} | {lead} | {r['note']} |")
    if len(rows) == 1:
        lines += ["", "Baselines were not computed (`report.baselines: false`)."] if not outcome.config.report.baselines else []
    else:
        lines += ["", "Each baseline is trained as the run's head is (fit_head with the run's training settings) and "
                  "scored on the same test images (see `jobs/baselines.py`); `report.baselines: false` skips them.",
                  "", "![the run against its baselines](baselines.png)"]
    return lines


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
