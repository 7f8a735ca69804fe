"""Featurization throughput: ``pipeline.featurize`` (its defaults) against the plain
PyTorch loop a user writes (a DataLoader decoding in worker processes, batch 64, the
default memory format) on the same JPEGs and model (efficientnet_lite0 frozen to the
global pooling), and against the CPU's limit: the model-only forward rate at its best
setting (memory format x batch size, all cores), back to back in one process. Plus where
the time goes, the fixed start-up and what it is made of, and on a GPU machine the GPU
images/s and utilisation.

    python -m benchmarks.featurize [--images 2000] [--threads N] [--workers N]
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
    """Milliseconds per image for each stage, measured one stage at a time in this process
    (preprocessing: decode + resize + crop on one core, as the read tasks do it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from freezeray.images import preprocess_bytes
    from pipeline.decode import normalize
    from surgery import split

    sample = paths[: min(len(paths), 128)]
    t = time.perf_counter()
    blobs = [p.read_bytes() for p in sample]
    read = time.perf_counter() - t
    t = time.thread_time()
    pixels = np.stack([preprocess_bytes(b, config) for b in blobs])
    prep = time.thread_time() - t
    torch.set_num_threads(threads)
    frozen = split(model).frozen.eval().to(memory_format=torch.channels_last)  # as the model actors run it
    x = torch.from_numpy(pixels[:batch_size])
    with torch.inference_mode():
        frozen(normalize(x[:4], config).contiguous(memory_format=torch.channels_last))  # warm-up
        t = time.perf_counter()
        feats = frozen(normalize(x, config).contiguous(memory_format=torch.channels_last))
        infer = time.perf_counter() - t
    t = time.perf_counter()
    table_ = pa.table({"features": pa.FixedShapeTensorArray.from_numpy_ndarray(feats.numpy().astype(np.float16))})
    pq.write_table(table_, io.BytesIO(), use_dictionary=False, compression="none")
    write = time.perf_counter() - t
    n, b = len(sample), len(x)
    return {"read_ms": 1e3 * read / n, "preprocess_ms": 1e3 * prep / n, "model_ms": 1e3 * infer / b, "write_ms": 1e3 * write / b}


# ---------------------------------------------------------------------------------------
# preprocessing per core-second: the path before issue 24 against the current one


def old_preprocess(data: bytes, config: Any) -> np.ndarray:
    """The CPU preprocessing as it was before the JPEG fast path (kept here to be measured
    against): PIL decodes the whole image, the whole image is resized, then cropped."""
    from freezeray.images import _RESAMPLE, _pad, decode_image, geometry

    _, out_h, out_w = config.input_size
    img = decode_image(data, config.input_size[0])
    g = geometry(img.size[0], img.size[1], config)
    if g.size != img.size:
        img = img.resize(g.size, resample=_RESAMPLE[config.interpolation])
    arr = _pad(np.asarray(img, dtype=np.uint8).reshape(g.size[1], g.size[0], -1), g)
    left, top = g.crop
    return arr[top:top + out_h, left:left + out_w].copy()


def _preprocess_share(args: tuple[str, list[str], dict]) -> tuple[int, float]:
    """One worker process's share: (images, CPU seconds) for ``which`` path."""
    from freezeray.images import PreprocessConfig, preprocess_bytes

    which, paths, config_dict = args
    config = PreprocessConfig.from_dict(config_dict)
    fn = old_preprocess if which == "old" else preprocess_bytes
    blobs = [Path(p).read_bytes() for p in paths]
    t = time.thread_time()
    for b in blobs:
        fn(b, config)
    return len(blobs), time.thread_time() - t


def preprocess_rates(sets: dict[str, list[str]], configs: dict[str, Any], repeats: int = 3,
                     processes: int | None = None) -> list[dict[str, Any]]:
    """Images per core-second of the old and the current preprocessing, side by side:
    on one core (this process, CPU time, the runs of both paths interleaved ``repeats``
    times, the best kept) and on the whole machine (``processes`` worker processes, one
    per core, each taking a share of the images; images/s over the wall time, and per
    core-second)."""
    import multiprocessing as mp
    import os

    from freezeray.images import preprocess_bytes

    processes = processes or os.cpu_count() or 1
    rows = []
    with mp.get_context("spawn").Pool(processes) as pool:
        pool.map(_preprocess_share, [("new", [], {})] * processes)  # the workers started and importing
        for set_name, paths in sets.items():
            blobs = [Path(p).read_bytes() for p in paths]
            for config_name, config in configs.items():
                one: dict[str, float] = {"old": float("inf"), "new": float("inf")}
                machine: dict[str, float] = {"old": float("inf"), "new": float("inf")}
                for _ in range(repeats):
                    for which, fn in (("old", old_preprocess), ("new", preprocess_bytes)):
                        t = time.thread_time()
                        for b in blobs:
                            fn(b, config)
                        one[which] = min(one[which], time.thread_time() - t)
                        shares = [(which, paths[i::processes], config.to_dict()) for i in range(processes)]
                        t = time.perf_counter()
                        pool.map(_preprocess_share, shares)
                        machine[which] = min(machine[which], time.perf_counter() - t)
                n = len(blobs)
                for which in ("old", "new"):
                    rows.append({"images": set_name, "interpolation": config_name,
                                 "path": "before (PIL, whole-image resize)" if which == "old" else "now (JPEG fast path)",
                                 "one_core_ms": 1e3 * one[which] / n, "one_core_per_core_s": n / one[which],
                                 "machine_images_per_s": n / machine[which],
                                 "machine_per_core_s": n / machine[which] / processes, "processes": processes})
                rows[-1]["one_core_ratio"] = one["old"] / one["new"]
                rows[-1]["machine_ratio"] = machine["old"] / machine["new"]
    return rows


def jpeg_accuracy(side: int = 1024, image_size: int = 96, seed: int = 0) -> dict[str, Any]:
    """Does the JPEG fast path cost accuracy? scikit-learn's digits written as ``side``-px
    JPEGs (so they are DCT-scaled), the demo's split, features of ImageNet
    efficientnet_lite0 at ``image_size`` from the old and the current preprocessing,
    logistic regression on each: held-out accuracy side by side. (The digits as PNGs, as
    the demo and the staged benchmark write them, take the PIL path, pixel for pixel as
    before.)"""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    import surgery
    from freezeray.images import dct_scale, preprocess_bytes
    from pipeline.decode import normalize

    from .sweep import demo_model

    digits = load_digits()
    blobs = []
    for img in digits.images:
        light = Image.fromarray((255 - img * 255 / 16).astype(np.uint8)).convert("RGB")  # dark on light, as the demo
        buf = io.BytesIO()
        light.resize((side, side), Image.BICUBIC).save(buf, "JPEG", quality=90)
        blobs.append(buf.getvalue())
    model = demo_model()
    config = surgery.get_info(model).preprocessing.with_size(image_size)
    helper = surgery.TransferLearningHelper(model)
    idx = np.arange(len(blobs))
    train, test = train_test_split(idx, test_size=0.25, random_state=seed, stratify=digits.target)
    out: dict[str, Any] = {"side": side, "image_size": image_size, "dct_scale": dct_scale(side, side, config),
                           "train": len(train), "test": len(test)}
    for name, fn in (("before", old_preprocess), ("now", preprocess_bytes)):
        t = time.thread_time()
        pixels = np.stack([fn(b, config) for b in blobs])
        out[f"{name}_preprocess_ms"] = 1e3 * (time.thread_time() - t) / len(blobs)
        with torch.inference_mode():
            feats = torch.cat([helper.featurize(normalize(torch.from_numpy(pixels[i:i + 64]), config))
                               for i in range(0, len(blobs), 64)]).flatten(1).numpy()
        clf = LogisticRegression(max_iter=3000, C=0.3).fit(feats[train], digits.target[train])
        out[f"{name}_accuracy"] = float(clf.score(feats[test], digits.target[test]))
        out[f"{name}_pixels"] = pixels
    diff = np.abs(out.pop("before_pixels").astype(np.int16) - out.pop("now_pixels"))
    out["pixel_mean_diff"], out["pixel_p99_diff"] = float(diff.mean()), float(np.percentile(diff, 99))
    return out


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


def model_limit(model: Any, config: Any, threads: int, batches: tuple[int, ...] = (8, 16, 32, 64),
                seconds: float = 3.0) -> dict[str, Any]:
    """The frozen model's forward rate (images/s) on random inputs, for each memory format
    and batch size, all cores; the best is the limit a featurization is compared to."""
    from surgery import split

    torch.set_num_threads(threads)
    frozen = split(model).frozen.eval()
    rates: dict[str, float] = {}
    for fmt_name, fmt in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
        m = frozen.to(memory_format=fmt)
        for b in batches:
            x = torch.randn(b, *config.input_size).contiguous(memory_format=fmt)
            with torch.inference_mode():
                m(x)  # warm-up
                done, t = 0, time.perf_counter()
                while time.perf_counter() - t < seconds:
                    m(x)
                    done += b
            rates[f"{fmt_name}, batch {b}"] = done / (time.perf_counter() - t)
    best = max(rates, key=rates.__getitem__)
    return {"rates": rates, "best_setting": best, "best_images_per_s": rates[best]}


def startup_parts(model: Any) -> dict[str, float]:
    """Where a featurization's fixed start-up goes: a fresh Python importing what a model
    actor imports, and shipping the frozen graph to a new process."""
    import subprocess
    import sys

    import ray

    from surgery import split

    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import pipeline.featurize, timm"], check=True)
    imports = time.perf_counter() - t
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    bare = time.perf_counter() - t
    ref = ray.put(split(model).frozen)
    t = time.perf_counter()
    ray.get(ray.remote(lambda r: type(ray.get(r[0])).__name__).remote([ref]))
    ship = time.perf_counter() - t
    return {"python_start_s": bare, "imports_s": imports - bare, "first_task_with_model_s": ship}


def _freezeray(model: Any, source: Any, config: Any, batch_size: int | None, num_actors: int | None, threads: int | None,
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


def _with_steady_state(model: Any, root: Path, config: Any, batch_size: int | None, num_actors: int | None,
                       threads: int | None, num_gpus: float | None = None, autocast: bool = True) -> dict[str, Any]:
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
        image_size: int | None = None, random_weights: bool = False, skip_cpu: bool = False,
        large_images: int = 48, preprocess_only: bool = False, thread_plans: tuple[int, ...] = ()) -> dict[str, Any]:
    """Plain PyTorch (a DataLoader with as many workers as cores, and with one; batch
    ``batch_size``) against freezeray with its defaults, and the model alone at its best
    setting; the ratios take the better plain loop. Before them, the preprocessing per
    core-second before and after the JPEG fast path, on ``images`` small JPEGs (at most
    400) and ``large_images`` JPEGs of 2,000-4,000 px. ``thread_plans``: featurize again
    with these torch thread counts in the model actor (the rest of the plan unchanged)."""
    import os
    from dataclasses import replace

    from surgery import split

    cpus = os.cpu_count() or 1
    threads = threads or cpus
    workers = workers if workers is not None else min(cpus, 8)
    root = DATA / f"jpegs-{images}"
    paths = [str(p) for p in sorted(write_jpegs(root, images))]
    large = [str(p) for p in sorted(write_jpegs(DATA / f"jpegs-large-{large_images}", large_images,
                                                min_side=2000, max_side=4000))]
    model, config = frozen_lite0(image_size, random_weights)
    frozen = split(model).frozen
    result: dict[str, Any] = {
        "settings": {"images": images, "large_images": large_images, "plain_batch_size": batch_size, "threads": threads,
                     "workers": workers, "input_size": list(config.input_size), "model": "efficientnet_lite0",
                     "weights": "random" if random_weights else "imagenet"},
        "note": "steady_images_per_s: marginal rate between a run on half the images and one on all of them; "
                "fixed_startup_s: the rest of the half run (actor processes, imports, model load)",
    }
    if not skip_cpu:
        configs = {"bilinear": replace(config, interpolation="bilinear"), config.interpolation: config}
        result["preprocess"] = preprocess_rates({"256-500 px": paths[:400], "2,000-4,000 px": large}, configs)
    if preprocess_only:
        return result
    start_ray()
    if not skip_cpu:
        limit = model_limit(model, config, threads)
        rows = []
        for w in sorted({workers, 1}, reverse=True):
            base = baseline_featurize(frozen, paths, config.to_dict(), Path(tempfile.mkdtemp()), batch_size, w, threads)
            rows.append({"system": f"plain PyTorch (DataLoader, {w} workers, batch {batch_size}, {threads} threads)", **base})
        best = max(r["images_per_s"] for r in rows)
        from pipeline import Resources
        from pipeline.runtime import plan_actors

        plan = plan_actors(Resources(use_gpu=False))
        ours = _with_steady_state(model, root, config, None, None, None, num_gpus=0)
        rows.append({"system": f"freezeray featurize (defaults: {plan.actors} actor, {plan.threads} threads, "
                               f"channels_last, batch 16)", **ours})
        rows.append({"system": f"model alone at its best setting ({limit['best_setting']})",
                     "images_per_s": limit["best_images_per_s"]})
        result.update(cpu=rows, limit=limit, ratio=ours["images_per_s"] / best,
                      steady_ratio=(ours["steady_images_per_s"] or 0) / best,
                      ratio_to_limit=ours["images_per_s"] / limit["best_images_per_s"],
                      steady_ratio_to_limit=(ours["steady_images_per_s"] or 0) / limit["best_images_per_s"],
                      startup=startup_parts(model),
                      stage_ms_per_image=stage_costs([Path(p) for p in paths], model, config, 16, threads))
        for n in thread_plans:
            plan = _with_steady_state(model, root, config, None, None, n, num_gpus=0)
            rows.append({"system": f"freezeray featurize, {n} torch threads in the actor", **plan})
    if torch.cuda.is_available():
        gpu_rows = []
        for decode in ("cpu", "gpu"):
            with _GpuSampler() as sampler:
                r = _gpu_run(model, root, config, decode)
            gpu_rows.append({"system": f"freezeray featurize on GPU, decode={decode}", **r,
                             "gpu_utilisation_pct": sampler.mean})
        with _GpuSampler() as sampler:
            gpu_base = baseline_featurize(frozen, paths, config.to_dict(), Path(tempfile.mkdtemp()), batch_size, workers,
                                          threads, device="cuda")
        gpu_rows.append({"system": f"plain PyTorch on GPU, fp32 (DataLoader, {workers} workers)", **gpu_base,
                         "gpu_utilisation_pct": sampler.mean})
        result["gpu"] = gpu_rows
    else:
        result["gpu"] = ("no GPU on this machine: the GPU figures are still to be measured, with "
                         "`python -m benchmarks.featurize --images 20000 --skip-cpu` on a GPU machine")
    return result


def _gpu_run(model: Any, root: Path, config: Any, decode: str) -> dict[str, Any]:
    import pipeline

    out = Path(tempfile.mkdtemp(prefix="fr-bench-gpu-"))
    try:
        t = time.perf_counter()
        fset = pipeline.featurize(model, str(root), str(out / "f"), preprocessing=config, decode=decode,
                                  resources=pipeline.Resources(use_gpu=True))
        seconds = time.perf_counter() - t
        return {"seconds": seconds, "images_per_s": fset.rows / seconds, "rows": fset.rows}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def report(result: dict[str, Any]) -> str:
    lines = []
    if "preprocess" in result:
        lines += ["preprocessing (decode + resize + crop to uint8), per core-second, before and now:",
                  table(result["preprocess"], ["images", "interpolation", "path", "one_core_ms", "one_core_per_core_s",
                                               "one_core_ratio", "machine_images_per_s", "machine_per_core_s",
                                               "machine_ratio"])]
    if "cpu" in result:
        startup = ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.1f}s" for k, v in result["startup"].items())
        lines += [
            table(result["cpu"], ["system", "images_per_s", "seconds", "steady_images_per_s", "fixed_startup_s"]),
            f"freezeray / best plain PyTorch: {result['ratio']:.2f} end to end, {result['steady_ratio']:.2f} in steady "
            f"state (goal >= 1.5); freezeray / the model alone at its best: {result['ratio_to_limit']:.2f} end to end, "
            f"{result['steady_ratio_to_limit']:.2f} in steady state (goal >= 0.85)",
            "model alone, images/s: " + ", ".join(f"{k} {v:.1f}" for k, v in result["limit"]["rates"].items()),
            f"start-up parts: {startup}",
            "where the time goes (ms per image; preprocessing on one core, the model on all threads): "
            + ", ".join(f"{k.removesuffix('_ms')} {v:.1f}" for k, v in result["stage_ms_per_image"].items()),
        ]
    if isinstance(result.get("gpu"), list):
        lines.append(table(result["gpu"], ["system", "images_per_s", "seconds", "gpu_utilisation_pct"]))
    elif "gpu" in result:
        lines.append(result["gpu"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.featurize", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64, help="the plain loop's batch size")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: all cores, at most 8)")
    p.add_argument("--image-size", type=int, default=None, help="model input size (default: the model's 224)")
    p.add_argument("--random-weights", action="store_true", help="skip the ImageNet weights (throughput is the same)")
    p.add_argument("--skip-cpu", action="store_true", help="only the GPU part")
    p.add_argument("--large-images", type=int, default=48, help="2,000-4,000 px JPEGs for the preprocessing rates")
    p.add_argument("--preprocess-only", action="store_true", help="only the preprocessing rates (about a minute)")
    p.add_argument("--thread-plans", type=int, nargs="*", default=[], help="also featurize with these actor thread counts")
    p.add_argument("--accuracy", action="store_true", help="only the accuracy check of the JPEG fast path (digits as JPEGs)")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    if a.accuracy:
        acc = jpeg_accuracy()
        print(", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in acc.items()))
        print(f"wrote {save_json('featurize-accuracy', acc, a.out)}")
        return 0
    result = run(a.images, a.batch_size, a.threads, a.workers, a.image_size, a.random_weights, a.skip_cpu,
                 a.large_images, a.preprocess_only, tuple(a.thread_plans))
    print(report(result))
    print(f"wrote {save_json('featurize', result, a.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
