"""The demo as a new user runs it: ``freezeray demo`` in a fresh process and a fresh
folder (a new Ray, the digits written, featurized, the head trained, evaluated, saved,
reported), then once more in the same folder (the features reused). Wall time of each,
the fit step's time and the held-out accuracy, against the goals.

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


def _demo(workdir: Path) -> dict[str, Any]:
    t = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a fresh local Ray, as a new user gets
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "demo", "--workdir", str(workdir)], capture_output=True,
                          text=True, env=env)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"the demo failed: {proc.stderr[-2000:]}")
    metrics = json.loads((workdir / "report" / "metrics.json").read_text())
    return {"wall_s": wall, "fit_s": metrics["timings_s"]["fit"], "featurize_s": metrics["timings_s"]["featurize"],
            "accuracy": metrics["evaluation"]["accuracy"], "epochs": len(metrics["history"]),
            "lines_printed": len((proc.stdout + proc.stderr).splitlines())}


def run() -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="fr-demo-"))
    try:
        first = _demo(work)
        second = _demo(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"rows": [{"run": "first (fresh folder: digits written, featurized)", **first},
                     {"run": "second (features reused)", **second}],
            "goals": {"first_wall_s": 75, "fit_s": 5, "accuracy": 0.95}}


def report(result: dict[str, Any]) -> str:
    first = result["rows"][0]
    return "\n".join([
        table(result["rows"], ["run", "wall_s", "featurize_s", "fit_s", "epochs", "accuracy", "lines_printed"]),
        f"first run {first['wall_s']:.0f}s (goal <= 75 s, was 139 s); fit {first['fit_s']:.1f}s (goal <= 5 s, was "
        f"60 s); accuracy {first['accuracy']:.4f} (goal >= 0.95)",
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
