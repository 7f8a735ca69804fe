"""Scale: wall time and peak memory (driver and Ray workers) featurizing 1x, 4x and 10x
the default image count. Goal: memory flat (10x data -> at most 1.25x peak memory),
time linear.

    python -m benchmarks.scale [--images 100] [--factors 1 4 10]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from .common import RESULTS, frozen_lite0, save_json, start_ray, table, write_jpegs

DATA = Path(__file__).parent / "data"


class MemorySampler:
    """Peak resident memory of this process (the driver) and of Ray's worker processes."""

    def __init__(self, period: float = 0.25) -> None:
        self.period, self.driver, self.worker_max, self.workers_total = period, 0, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._me = psutil.Process(os.getpid())

    def _run(self) -> None:
        while not self._stop.is_set():
            self.driver = max(self.driver, self._me.memory_info().rss)
            total = 0
            for p in psutil.process_iter(["name", "cmdline", "memory_info"]):
                try:
                    name = p.info["name"] or ""
                    cmd = " ".join(p.info["cmdline"] or [])
                    if name.startswith("ray::") or cmd.startswith("ray::") or "default_worker.py" in cmd:
                        rss = p.info["memory_info"].rss
                        total += rss
                        self.worker_max = max(self.worker_max, rss)
                except (psutil.NoSuchProcess, psutil.AccessDenied, TypeError):
                    continue
            self.workers_total = max(self.workers_total, total)
            time.sleep(self.period)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def run(images: int = 100, factors: tuple[int, ...] = (1, 4, 10), image_size: int | None = 160) -> dict[str, Any]:
    import pipeline

    model, config = frozen_lite0(image_size)
    start_ray()
    rows = []
    for f in factors:
        n = images * f
        root = DATA / f"jpegs-{n}"
        write_jpegs(root, n)
        out = Path(tempfile.mkdtemp(prefix="fr-scale-"))
        try:
            with MemorySampler() as mem:
                t = time.perf_counter()
                fset = pipeline.featurize(model, str(root), str(out / "features"), preprocessing=config)
                seconds = time.perf_counter() - t
        finally:
            shutil.rmtree(out, ignore_errors=True)
        rows.append({"factor": f, "images": fset.rows, "seconds": seconds, "images_per_s": fset.rows / seconds,
                     "driver_peak_mb": mem.driver / 2**20, "worker_peak_mb": mem.worker_max / 2**20,
                     "workers_total_peak_mb": mem.workers_total / 2**20})
    first, last = rows[0], rows[-1]
    slope = (last["seconds"] - first["seconds"]) / max(1, last["images"] - first["images"])
    return {
        "settings": {"images": images, "factors": list(factors), "input_size": list(config.input_size)},
        "rows": rows,
        "memory_ratio_driver": last["driver_peak_mb"] / first["driver_peak_mb"],
        "memory_ratio_workers_total": last["workers_total_peak_mb"] / first["workers_total_peak_mb"],
        "seconds_per_extra_image": slope,
        "fixed_s": first["seconds"] - slope * first["images"],
    }


def report(result: dict[str, Any]) -> str:
    return "\n".join([
        table(result["rows"], ["factor", "images", "seconds", "images_per_s", "driver_peak_mb", "worker_peak_mb",
                               "workers_total_peak_mb"]),
        f"peak memory {result['settings']['factors'][-1]}x / 1x: driver {result['memory_ratio_driver']:.2f}, "
        f"workers {result['memory_ratio_workers_total']:.2f} (goal <= 1.25); time = {result['fixed_s']:.1f}s + "
        f"{1e3 * result['seconds_per_extra_image']:.1f} ms per image",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--factors", type=int, nargs="+", default=[1, 4, 10])
    p.add_argument("--image-size", type=int, default=160)
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    result = run(a.images, tuple(a.factors), a.image_size)
    print(report(result))
    print(f"wrote {save_json('scale', result, a.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
