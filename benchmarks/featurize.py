"""Featurization throughput: ``pipeline.featurize`` against the plain PyTorch loop on the
same JPEGs, model (efficientnet_lite0 frozen to the global pooling), batch size and
thread count, back to back in one process; plus where the time goes, and on a GPU
machine the GPU images/s and utilisation with fp16 autocast on and off.

    python -m benchmarks.featurize [--images 2000] [--batch-size 64] [--threads N] [--workers N]
"""

from __future__ import annotations

import argparse
import io
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .common import (
    RESULTS,
    baseline_featurize,
    frozen_lite0,
    save_json,
    start_ray,
    table,
    write_jpegs,
)

DATA = Path(__file__).parent / "data"


def stage_costs(paths: list[Path], model: Any, config: Any, batch_size: int, threads: int) -> dict[str, float]:
    """Milliseconds per image for each stage, measured one stage at a time in this process."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from surgery import split
    from surgery.preprocess import decode_image, normalize, resize_crop

    sample = paths[: min(len(paths), 128)]
    t = time.perf_counter()
    blobs = [p.read_bytes() for p in sample]
    read = time.perf_counter() - t
    t = time.perf_counter()
    images = [decode_image(b) for b in blobs]
    decode = time.perf_counter() - t
    t = time.perf_counter()
    pixels = np.stack([resize_crop(img, config) for img in images])
    resize = time.perf_counter() - t
    torch.set_num_threads(threads)
    frozen = split(model).frozen.eval()
    x = torch.from_numpy(pixels[:batch_size])
    with torch.inference_mode():
        frozen(normalize(x[:4], config))  # warm-up
        t = time.perf_counter()
        feats = frozen(normalize(x, config))
        infer = time.perf_counter() - t
    t = time.perf_counter()
    table_ = pa.table({"features": pa.FixedShapeTensorArray.from_numpy_ndarray(feats.numpy().astype(np.float16))})
    pq.write_table(table_, io.BytesIO(), use_dictionary=False, compression="none")
    write = time.perf_counter() - t
    n, b = len(sample), len(x)
    return {"read_ms": 1e3 * read / n, "decode_ms": 1e3 * decode / n, "resize_crop_ms": 1e3 * resize / n,
            "model_ms": 1e3 * infer / b, "write_ms": 1e3 * write / b}


class _GpuSampler:
    """Samples GPU utilisation (nvidia-smi's figure, via NVML) while a run is in progress."""

    def __init__(self, period: float = 0.2) -> None:
        self.period, self.samples, self._stop = period, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(float(torch.cuda.utilization(0)))
            except Exception:
                return
            time.sleep(self.period)

    def __enter__(self) -> "_GpuSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    @property
    def mean(self) -> float | None:
        busy = [s for s in self.samples]
        return float(np.mean(busy)) if busy else None


def _freezeray(model: Any, source: Any, config: Any, batch_size: int, num_actors: int, threads: int | None,
               num_gpus: float | None = None, autocast: bool = True) -> dict[str, Any]:
    import pipeline

    out = Path(tempfile.mkdtemp(prefix="fr-bench-"))
    first: list[float] = []
    try:
        t = time.perf_counter()
        resources = pipeline.Resources(num_workers=num_actors, threads_per_worker=threads, gpus_per_worker=num_gpus)
        fset = pipeline.featurize(model, source, str(out / "features"), preprocessing=config, batch_size=batch_size,
                                  resources=resources, autocast=autocast,
                                  progress=lambda i, rows, errors: first or first.append(time.perf_counter()))
        seconds = time.perf_counter() - t
        return {"seconds": seconds, "images_per_s": fset.rows / seconds, "rows": fset.rows}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _with_steady_state(model: Any, root: Path, config: Any, batch_size: int, num_actors: int, threads: int | None,
                       num_gpus: float | None = None, autocast: bool = True) -> dict[str, Any]:
    """One run on all images and one on half of them: the difference is the marginal
    cost of the second half, free of the fixed start-up (actor processes, imports)."""
    import numpy as np

    from pipeline import read_images

    src = read_images(str(root))
    full = _freezeray(model, src, config, batch_size, num_actors, threads, num_gpus, autocast)
    half = _freezeray(model, src.subset(np.arange(len(src) // 2)), config, batch_size, num_actors, threads, num_gpus, autocast)
    extra = full["seconds"] - half["seconds"]
    steady = (full["rows"] - half["rows"]) / extra if extra > 0 else None
    fixed = half["seconds"] - half["rows"] / steady if steady else None
    return {**full, "steady_images_per_s": steady, "fixed_startup_s": fixed}


def run(images: int = 2000, batch_size: int = 64, threads: int | None = None, workers: int | None = None,
        image_size: int | None = None, random_weights: bool = False, skip_cpu: bool = False) -> dict[str, Any]:
    """Plain PyTorch (with as many DataLoader workers as cores, and with one) against
    freezeray with its default actor plan (on CPU: one actor using every core) and with
    one single-threaded actor per core; the ratio takes the better baseline."""
    import os

    from surgery import split

    cpus = os.cpu_count() or 1
    threads = threads or cpus
    workers = workers if workers is not None else min(cpus, 8)
    root = DATA / f"jpegs-{images}"
    paths = [str(p) for p in sorted(write_jpegs(root, images))]
    model, config = frozen_lite0(image_size, random_weights)
    frozen = split(model).frozen
    start_ray()
    result: dict[str, Any] = {
        "settings": {"images": images, "batch_size": batch_size, "threads": threads, "workers": workers,
                     "input_size": list(config.input_size), "model": "efficientnet_lite0",
                     "weights": "random" if random_weights else "imagenet"},
        "note": "steady_images_per_s: marginal rate between a run on half the images and one on all of them; "
                "fixed_startup_s: the rest of the half run (actor processes, imports, model load)",
    }
    if not skip_cpu:
        rows = []
        for w in sorted({workers, 1}, reverse=True):
            base = baseline_featurize(frozen, paths, config.to_dict(), Path(tempfile.mkdtemp()), batch_size, w, threads)
            rows.append({"system": f"plain PyTorch (DataLoader, {w} workers, {threads} threads)", **base})
        best = max(r["images_per_s"] for r in rows)
        ours = _with_steady_state(model, root, config, batch_size, None, None, num_gpus=0)
        rows.append({"system": f"freezeray featurize (default: 1 actor, {threads} threads)", **ours})
        if threads > 1:
            per_core = _with_steady_state(model, root, config, batch_size, min(threads, 8), 1, num_gpus=0)
            rows.append({"system": f"freezeray featurize ({min(threads, 8)} actors, 1 thread each)", **per_core})
        result.update(cpu=rows, ratio=ours["images_per_s"] / best, steady_ratio=(ours["steady_images_per_s"] or 0) / best,
                      stage_ms_per_image=stage_costs([Path(p) for p in paths], model, config, batch_size, threads))
    if torch.cuda.is_available():
        gpu_rows = []
        for autocast in (False, True):
            with _GpuSampler() as sampler:
                r = _with_steady_state(model, root, config, batch_size, None, None, num_gpus=1, autocast=autocast)
            gpu_rows.append({"system": f"freezeray featurize on GPU, fp16 autocast {'on' if autocast else 'off'}",
                             **r, "gpu_utilisation_pct": sampler.mean})
        with _GpuSampler() as sampler:
            gpu_base = baseline_featurize(frozen, paths, config.to_dict(), Path(tempfile.mkdtemp()), batch_size, workers,
                                          threads, device="cuda")
        gpu_rows.append({"system": f"plain PyTorch on GPU, fp32 (DataLoader, {workers} workers)", **gpu_base,
                         "gpu_utilisation_pct": sampler.mean})
        result["gpu"] = gpu_rows
    else:
        result["gpu"] = "no GPU on this machine: the GPU part was skipped"
    return result


def report(result: dict[str, Any]) -> str:
    lines = []
    if "cpu" in result:
        lines += [
            table(result["cpu"], ["system", "images_per_s", "seconds", "steady_images_per_s", "fixed_startup_s"]),
            f"ratio freezeray (default plan) / best plain PyTorch: {result['ratio']:.2f} end to end, "
            f"{result['steady_ratio']:.2f} in steady state (goal >= 1.0)",
            "where the time goes (ms per image; decode stages on one core, the model on all threads): "
            + ", ".join(f"{k.removesuffix('_ms')} {v:.1f}" for k, v in result["stage_ms_per_image"].items()),
        ]
    if isinstance(result["gpu"], list):
        lines.append(table(result["gpu"], ["system", "images_per_s", "steady_images_per_s", "gpu_utilisation_pct"]))
    else:
        lines.append(result["gpu"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.featurize", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: all cores, at most 8)")
    p.add_argument("--image-size", type=int, default=None, help="model input size (default: the model's 224)")
    p.add_argument("--random-weights", action="store_true", help="skip the ImageNet weights (throughput is the same)")
    p.add_argument("--skip-cpu", action="store_true", help="only the GPU part")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    result = run(a.images, a.batch_size, a.threads, a.workers, a.image_size, a.random_weights, a.skip_cpu)
    print(report(result))
    print(f"wrote {save_json('featurize', result, a.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
