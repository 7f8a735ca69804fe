"""The demo as a new user runs it: ``freezeray demo`` in a fresh process and a fresh
folder (a new Ray; the surfaces' patches written, featurized, the head trained,
evaluated, both baselines computed, the model saved, the report written), then once more
in the same folder (every feature set reused, the baselines' too). Wall time of each,
the steps' times, the held-out accuracy beside its two baselines and the lines printed,
against issue 25's goals.

    python -m benchmarks.demo
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import RESULTS, save_json, table

GOALS = {"first_wall_s": 60, "lines_printed": 15, "lead_points": 15}


def _demo(workdir: Path) -> dict[str, Any]:
    t = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a fresh local Ray, as a new user gets
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "demo", "--workdir", str(workdir)], capture_output=True,
                          text=True, env=env)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"the demo failed: {proc.stderr[-2000:]}")
    metrics = json.loads((workdir / "report" / "metrics.json").read_text())
    accuracy = metrics["evaluation"]["accuracy"]
    base = {b["name"]: b["accuracy"] for b in metrics.get("baselines") or []}
    timings = metrics["timings_s"]
    return {"wall_s": wall, "featurize_s": timings["featurize"], "fit_s": timings["fit"],
            "baselines_s": timings.get("baselines", 0.0), "accuracy": accuracy,
            "pixels": base.get("pixels"), "random_backbone": base.get("random backbone"),
            "epochs": len(metrics["history"]), "lines_printed": len((proc.stdout + proc.stderr).splitlines())}


def run() -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="fr-demo-"))
    try:
        first = _demo(work)
        second = _demo(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"rows": [{"run": "first (fresh folder: patches written, featurized)", **first},
                     {"run": "second (features reused)", **second}],
            "goals": GOALS}


def _lead(row: dict[str, Any], name: str) -> str:
    return "n/a" if row[name] is None else f"{100 * (row['accuracy'] - row[name]):+.1f} points"


def report(result: dict[str, Any]) -> str:
    first = result["rows"][0]
    return "\n".join([
        table(result["rows"], ["run", "wall_s", "featurize_s", "fit_s", "baselines_s", "accuracy", "pixels",
                               "random_backbone", "lines_printed"]),
        f"first run {first['wall_s']:.0f}s (goal <= {GOALS['first_wall_s']} s), {first['lines_printed']} lines printed "
        f"(goal <= {GOALS['lines_printed']}); accuracy {first['accuracy']:.4f}, lead over the pixel baseline "
        f"{_lead(first, 'pixels')}, over the random backbone {_lead(first, 'random_backbone')} "
        f"(goal >= {GOALS['lead_points']} points each)",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    result = run()
    print(report(result))
    print(f"wrote {save_json('demo', result, a.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
