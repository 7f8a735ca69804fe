"""Streaming head training: rows/s of ``fit_head`` streaming each worker's shards from
storage against the same run holding the features in memory (on a set that fits), and
the workers' peak memory streaming a small and a 10x larger feature set. Goals:
streaming >= 0.8x the in-memory rows/s; peak worker memory on the larger set <= 1.2x the
smaller's.

Synthetic features (1,280 float16 values a row, separable by class, in shards of 8,192
rows, as ``benchmarks.head`` writes them); the same model, seed, batch size and workers.

    python -m benchmarks.stream [--rows 400000] [--factor 10] [--workers 2] [--epochs 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline import Batches, Resources, Run, Stopping

from .common import RESULTS, frozen_lite0, save_json, start_ray, table
from .head import synthetic_features
from .scale import DATA, MemorySampler


def _fit(model: Any, fset: Any, workers: int, epochs: int, batch_size: int, stream: bool, runs: Path) -> dict[str, Any]:
    import pipeline

    os.environ["FREEZERAY_WORKER_MEMORY_BYTES"] = "1" if stream else str(1 << 40)
    try:
        with MemorySampler(period=0.2) as mem:
            base = mem._me.memory_info().rss
            t = time.perf_counter()
            r = pipeline.fit_head(model, fset, stopping=Stopping(epochs=epochs),
                                  batches=Batches(batch_size=batch_size), resources=Resources(num_workers=workers),
                                  run=Run(storage=str(runs), name=f"{'stream' if stream else 'memory'}-{fset.rows}"))
            seconds = time.perf_counter() - t
    finally:
        os.environ.pop("FREEZERAY_WORKER_MEMORY_BYTES", None)
    rows = sum(h["rows"] for h in r.history)
    epoch_s = sum(h["seconds"] for h in r.history)
    return {"mode": "streaming" if stream else "in memory", "rows": fset.rows, "epochs": len(r.history),
            "rows_per_s": rows / epoch_s, "seconds": seconds, "startup_s": r.startup_s,
            "feature_gb": sum(s.bytes for s in fset.shards) / 1e9, "worker_peak_mb": mem.worker_max / 2**20,
            "driver_growth_mb": (mem.driver - base) / 2**20, "accuracy": r.history[-1]["accuracy"]}


def run(rows: int = 400_000, factor: int = 10, workers: int = 2, epochs: int = 2, batch_size: int = 512) -> dict[str, Any]:
    model, _ = frozen_lite0(None, random_weights=True)
    start_ray()
    work = Path(tempfile.mkdtemp(prefix="fr-stream-", dir=DATA if DATA.exists() else None))
    try:
        small = synthetic_features(model, str(work / "small"), rows)
        memory = _fit(model, small, workers, epochs, batch_size, False, work / "runs")
        streamed = _fit(model, small, workers, epochs, batch_size, True, work / "runs")
        shutil.rmtree(work / "runs", ignore_errors=True)
        large = synthetic_features(model, str(work / "large"), rows * factor, seed=1)
        streamed_large = _fit(model, large, workers, 1, batch_size, True, work / "runs")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"settings": {"rows": rows, "factor": factor, "workers": workers, "epochs": epochs, "batch_size": batch_size},
            "rows": [memory, streamed, streamed_large],
            "rows_per_s_ratio": streamed["rows_per_s"] / memory["rows_per_s"],
            "peak_ratio": streamed_large["worker_peak_mb"] / streamed["worker_peak_mb"]}


def report(result: dict[str, Any]) -> str:
    return "\n".join([
        table(result["rows"], ["mode", "rows", "feature_gb", "epochs", "rows_per_s", "startup_s", "worker_peak_mb",
                               "driver_growth_mb", "accuracy"]),
        f"streaming / in memory: {result['rows_per_s_ratio']:.2f}x the rows/s (goal >= 0.8); worker peak memory on "
        f"{result['settings']['factor']}x the rows: {result['peak_ratio']:.2f}x (goal <= 1.2)",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stream", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=400_000)
    p.add_argument("--factor", type=int, default=10)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    result = run(a.rows, a.factor, a.workers, a.epochs, a.batch_size)
    print(report(result))
    print(f"wrote {save_json('stream', result, a.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
