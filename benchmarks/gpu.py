"""The GPU check (issue 24): every CUDA path of freezeray, with assertions and figures, in
one run of at most about 8 minutes on a GPU machine, JSON out.

    python -m benchmarks.gpu [--images 20000] [--time-limit 480] [--dry]

In order (each check records what it asserted and what it measured):

1. **pixels**: the batched decoder of ``decode="gpu"`` (nvJPEG through
   ``torchvision.io.decode_jpeg`` on the device, resize and crop as tensors) against the
   CPU path (:func:`freezeray.images.preprocess_bytes`) on the same JPEGs, small and
   2,000-4,000 px: every image within :data:`pipeline.decode.PIXEL_TOLERANCE`;
2. **features, GPU decode vs CPU decode**: ``featurize`` with ``decode="gpu"`` and
   ``decode="cpu"`` on GPU actors (fp16 autocast on, ``channels_last``, the actors'
   defaults): the same rows and error rows, features within :data:`FEATURE_TOLERANCE`
   (relative mean absolute difference); and fp16 autocast against float32 features within
   :data:`AUTOCAST_TOLERANCE`;
3. **fit_head** on the GPU (one Ray Train worker): it trains and beats chance on held-out digits;
4. **finetune** from images on the GPU with ``mixed_precision="fp16"`` (a ``GradScaler``)
   and with ``"bf16"``: finite losses, and the fine-tuned model scores;
5. **evaluate and predict** on GPU actors: the accuracy of the CPU within
   :data:`ACCURACY_TOLERANCE`, one prediction per readable image;
6. **throughput**: ``efficientnet_lite0`` (ImageNet weights) and ResNet-50 (random weights:
   nothing is downloaded; the cost is the same) over ``--images`` JPEGs (256-500 px),
   CPU decoding vs GPU decoding: images/s and mean GPU utilisation (NVML), until
   ``--time-limit`` is spent (what is left is recorded as skipped).

Without a GPU (or with ``--dry``) the same sequence runs on the CPU at tiny sizes:
every step but the CUDA calls (actors on the CPU, the batched decoder on the CPU device,
mixed precision falling back to float32 as it does there), so the script cannot rot
(``tests/test_benchmarks.py`` runs it in ``make test``). A dry run's figures are not GPU
figures and say so (``"dry": true``).
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .common import RESULTS, save_json, start_ray, table, write_jpegs
from .featurize import DATA, _GpuSampler

FEATURE_TOLERANCE = 0.05  # GPU decode vs CPU decode: mean |a - b| / mean |a| of the features
AUTOCAST_TOLERANCE = 0.03  # fp16 autocast vs float32 features, the same measure
ACCURACY_TOLERANCE = 0.01  # evaluate on GPU actors vs on the CPU (float16 rounding may flip a row or two)


class _Checks:
    """Runs named checks, records each one's figures and whether it passed; a failed
    assertion is recorded and raised at the end, so one run reports every check."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def run(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        t = time.perf_counter()
        try:
            figures = fn()
            row = {"check": name, "passed": True, **figures}
        except AssertionError as exc:
            figures = {}
            row = {"check": name, "passed": False, "failure": str(exc)}
        row["seconds"] = time.perf_counter() - t
        self.rows.append(row)
        return figures

    def failures(self) -> list[str]:
        return [f"{r['check']}: {r['failure']}" for r in self.rows if not r["passed"]]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().mean() / a.float().abs().mean().clamp_min(1e-12))


def _lite0(classes: int, frozen: str = "global_pool", mixed_precision: bool | str = False) -> Any:
    import surgery
    from surgery.layers import Output

    base = surgery.zoo.load("efficientnet_lite0", weights="imagenet")
    return (surgery.TransferLearning(base)
            .fine_tune_configuration(surgery.FineTuneConfiguration(updater="adam", lr=1e-3, seed=0,
                                                                   mixed_precision=mixed_precision))
            .set_feature_extractor(frozen).remove_vertex_keep_connections("classifier")
            .add_layer("classifier", Output(classes, loss="cross_entropy")).build())


def _resnet50() -> Any:
    import surgery
    from surgery.layers import Output

    base = surgery.zoo.load("resnet50")  # random weights: nothing to download, the same cost
    return (surgery.TransferLearning(base).set_feature_extractor("avgpool").remove_vertex_keep_connections("fc")
            .add_layer("fc", Output(4, loss="cross_entropy")).build())


def run(images: int = 20000, dry: bool = False, time_limit: float = 480.0, check_images: int = 512,
        digits_per_class: int | None = 60, image_size: int | None = None, min_accuracy: float = 0.5) -> dict[str, Any]:
    """Every check in order (see the module docstring); ``dry`` (or no CUDA): on the CPU.
    ``min_accuracy``: what the head must reach on the held-out digits after 5 epochs."""
    import pipeline
    from freezeray.images import PreprocessConfig, preprocess_bytes
    from jobs.demo import write_digits
    from pipeline import Resources
    from pipeline.decode import PIXEL_TOLERANCE, decode_batch, mean_difference

    cuda = torch.cuda.is_available() and not dry
    device = torch.device("cuda" if cuda else "cpu")
    started = time.perf_counter()
    start_ray()
    work = Path(tempfile.mkdtemp(prefix="fr-gpu-"))
    small = [str(p) for p in sorted(write_jpegs(DATA / f"jpegs-{check_images}", check_images))]
    large = [str(p) for p in sorted(write_jpegs(DATA / "jpegs-large-8", 8, min_side=2000, max_side=4000))]
    digits = DATA / ("digits" if digits_per_class is None else f"digits-{digits_per_class}")
    write_digits(str(digits), per_class=digits_per_class)
    # the actors: one per GPU; dry: one CPU actor that runs the same code on its CPU
    actors = Resources(use_gpu=True) if cuda else Resources(use_gpu=False, num_workers=1, cpus_per_worker=0.5)
    gpu_workers = pipeline.Resources(use_gpu=cuda, num_workers=1 if cuda else 0)
    runs = str(work / "runs")
    size = image_size or (224 if cuda else 64)
    checks = _Checks()
    result: dict[str, Any] = {"dry": not cuda, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
                              "settings": {"images": images, "check_images": check_images, "image_size": size,
                                           "time_limit_s": time_limit, "digits_per_class": digits_per_class}}
    try:
        def pixels() -> dict[str, Any]:
            config = PreprocessConfig(input_size=(3, size, size), interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3)
            files = small[:64] + large
            blobs = [Path(p).read_bytes() for p in files]
            got, errors = decode_batch(blobs, [""] * len(blobs), config, device)
            assert errors == [""] * len(blobs), f"decode errors: {[e for e in errors if e][:3]}"
            worst = max(mean_difference(got[i].cpu().numpy(), preprocess_bytes(b, config)) for i, b in enumerate(blobs))
            assert worst[0] <= PIXEL_TOLERANCE["mean"] and worst[1] <= PIXEL_TOLERANCE["p99"], f"worst {worst}"
            return {"images": len(blobs), "worst_mean_diff": worst[0], "worst_p99_diff": worst[1]}

        checks.run(f"pixels: batched decoder on {device.type} vs the CPU path", pixels)
        lite0 = _lite0(4)
        folder = str(Path(small[0]).parents[1])

        def features() -> dict[str, Any]:
            kw = dict(image_size=size, resources=actors, dtype="float32")
            on_cpu = pipeline.featurize(lite0, folder, str(work / "f-cpu"), decode="cpu", **kw)
            on_gpu = pipeline.featurize(lite0, folder, str(work / "f-gpu"), decode="gpu", **kw)
            fp32 = pipeline.featurize(lite0, folder, str(work / "f-fp32"), decode="gpu", autocast=False, **kw)
            assert (on_gpu.rows, on_gpu.errors) == (on_cpu.rows, on_cpu.errors) == (len(small), 0)
            a, b, c = on_cpu.to_tensors()[0], on_gpu.to_tensors()[0], fp32.to_tensors()[0]
            decode_diff, autocast_diff = _relative(a, b), _relative(c, b)
            assert decode_diff <= FEATURE_TOLERANCE, f"GPU vs CPU decoding: {decode_diff:.4f}"
            assert autocast_diff <= AUTOCAST_TOLERANCE, f"fp16 autocast vs float32: {autocast_diff:.4f}"
            return {"rows": on_gpu.rows, "decode_relative_diff": decode_diff, "autocast_relative_diff": autocast_diff}

        checks.run("features: featurize decode=gpu vs decode=cpu, fp16 autocast vs float32", features)
        model10 = _lite0(10)
        head: dict[str, Any] = {}

        def fit() -> dict[str, Any]:
            feats = pipeline.featurize(model10, str(digits / "train"), str(work / "digits-f"), image_size=96,
                                       resources=actors)
            r = pipeline.fit_head(model10, feats, stopping=pipeline.Stopping(epochs=5), resources=gpu_workers,
                                  run=pipeline.Run(name="head", storage=runs))
            acc = pipeline.evaluate(r.model, str(digits / "test"), image_size=96).accuracy
            assert acc >= min_accuracy, f"held-out accuracy {acc:.3f} after 5 epochs (at least {min_accuracy})"
            head["model"] = r.model
            return {"mode": r.mode, "workers": r.workers, "rows_per_s": r.rows_per_s, "accuracy": acc,
                    "loss": r.history[-1]["loss"]}

        checks.run("fit_head on the device", fit)
        for precision in ("fp16", "bf16"):
            def tune(precision: str = precision) -> dict[str, Any]:
                model = _lite0(10, frozen="blocks.5", mixed_precision=precision)
                r = pipeline.finetune(model, str(digits / "train"), stopping=pipeline.Stopping(epochs=1),
                                      batches=pipeline.Batches(batch_size=32, image_size=96, augment=False),
                                      resources=gpu_workers, run=pipeline.Run(name=f"tune-{precision}", storage=runs))
                losses = [h["loss"] for h in r.history]
                assert losses and all(math.isfinite(v) for v in losses), f"losses {losses}"
                return {"loss": losses[-1], "rows_per_s": r.rows_per_s, "seconds": r.seconds}

            checks.run(f"finetune from images, mixed_precision={precision!r}", tune)

        def score() -> dict[str, Any]:
            assert "model" in head, "fit_head failed: no model to score"
            on_device = pipeline.evaluate(head["model"], str(digits / "test"), image_size=96, resources=actors)
            on_cpu = pipeline.evaluate(head["model"], str(digits / "test"), image_size=96,
                                       resources=Resources(use_gpu=False, num_workers=1))
            assert abs(on_device.accuracy - on_cpu.accuracy) <= ACCURACY_TOLERANCE, (on_device.accuracy, on_cpu.accuracy)
            pred = pipeline.predict(head["model"], str(digits / "test"), str(work / "pred"), image_size=96, resources=actors)
            assert pred.rows == on_device.rows and pred.errors == 0, (pred.rows, on_device.rows)
            return {"accuracy": on_device.accuracy, "cpu_accuracy": on_cpu.accuracy, "predictions": pred.rows}

        checks.run("evaluate and predict on the device", score)
        result["throughput"] = _throughput(images, size, cuda, actors, work, started, time_limit)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["checks"] = checks.rows
    result["failures"] = checks.failures()
    result["seconds"] = time.perf_counter() - started
    return result


def _throughput(images: int, size: int, cuda: bool, actors: Any, work: Path, started: float,
                time_limit: float) -> list[dict[str, Any]]:
    """images/s and GPU utilisation of featurize for each model and decoding, while time is left."""
    import pipeline

    root = DATA / f"jpegs-{images}"
    write_jpegs(root, images)
    rows = []
    for name, build in (("efficientnet_lite0", lambda: _lite0(4)), ("resnet50", _resnet50)):
        model = build()
        for decode in ("cpu", "gpu"):
            if time.perf_counter() - started > time_limit:
                rows.append({"model": name, "decode": decode, "skipped": "time limit reached"})
                continue
            out = work / f"t-{name}-{decode}"
            with _GpuSampler() as sampler:
                t = time.perf_counter()
                fset = pipeline.featurize(model, str(root), str(out), image_size=size, decode=decode, resources=actors)
                seconds = time.perf_counter() - t
            shutil.rmtree(out, ignore_errors=True)
            rows.append({"model": name, "decode": decode, "rows": fset.rows, "seconds": seconds,
                         "images_per_s": fset.rows / seconds,
                         "gpu_utilisation_pct": sampler.mean if cuda else None})
    return rows


def report(result: dict[str, Any]) -> str:
    lines = [f"device: {result['device']}{' (dry run: CPU, not GPU figures)' if result['dry'] else ''}"]
    for row in result["checks"]:
        figures = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                            if k not in ("check", "passed", "failure"))
        lines.append(f"{'PASS' if row['passed'] else 'FAIL'}  {row['check']}: {row.get('failure') or figures}")
    lines.append(table(result["throughput"], ["model", "decode", "rows", "seconds", "images_per_s",
                                              "gpu_utilisation_pct", "skipped"]))
    lines.append(f"total {result['seconds']:.0f} s; {len(result['failures'])} check(s) failed")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=20000, help="JPEGs for the throughput runs")
    p.add_argument("--time-limit", type=float, default=480.0, help="seconds; throughput runs after it are skipped")
    p.add_argument("--dry", action="store_true", help="run on the CPU even where CUDA is present")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    result = run(a.images, a.dry, a.time_limit)
    print(report(result))
    print(f"wrote {save_json('gpu', result, a.out)}")
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
