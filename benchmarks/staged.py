"""Staged fine-tuning: the head on cached features, then the last blocks unfrozen from the
images (freezeray), against the same schedule run from images throughout (fastai's
``fine_tune(freeze_epochs)``, Lightning's ``BackboneFinetuning``), on the demo's task
(``--task surfaces``, the default: patches of scikit-image's pictures; or ``digits``,
scikit-learn's) with ImageNet ``efficientnet_lite0`` at the demo's 96 px, side by side in
one process. Reports held-out (test split) accuracy after the head alone and after the whole
schedule, and each way's wall time. Goals: the staged run beats the head alone, in less
time than the images-throughout run.

    python -m benchmarks.staged [--task surfaces] [--head-epochs 30] [--tune-epochs 5] [--tune-lr 3e-4]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import RESULTS, save_json, start_ray, table
from .sweep import DATA, demo_model

UNFROZEN = ("blocks.6", "conv_head", "bn2")  # the last block and the head convolution
AUGMENT: dict[str, tuple[Any, ...]] = {
    # a surface has no left or right: torchvision's standard recipe, with crops that keep half the patch
    "surfaces": ({"RandomResizedCrop": {"scale": [0.5, 1.0]}}, "RandomHorizontalFlip"),
    # digits are not photos: no flips (a flipped 2 is no digit), and crops that keep most of the digit
    "digits": ({"RandomResizedCrop": {"scale": [0.7, 1.0], "ratio": [0.9, 1.1]}},),
}


def _write(task: str, per_class: int | None) -> Path:
    """The task's images under benchmarks/data (kept: a second run writes nothing)."""
    from jobs.demo import write_digits, write_surfaces

    root = DATA / (task if per_class is None else f"{task}-{per_class}")
    if task == "digits":
        write_digits(str(root), per_class=per_class)
    elif per_class is None:
        write_surfaces(str(root))
    else:
        write_surfaces(str(root), per_class, max(1, per_class // 2))
    return root


def run(head_epochs: int = 30, tune_epochs: int = 5, tune_lr: float = 3e-4, per_class: int | None = None,
        seed: int = 0, task: str = "surfaces") -> dict[str, Any]:
    import pipeline
    from pipeline import Stage

    start_ray()
    work = Path(tempfile.mkdtemp(prefix="fr-staged-"))
    root = _write(task, per_class)
    # Stage's defaults (the BatchNorm layers unfrozen train their statistics); keeping them (train_bn=False) is
    # measured too, from the same head
    stages = [Stage(epochs=head_epochs), Stage(unfreeze=UNFROZEN, epochs=tune_epochs, lr=tune_lr)]
    common = dict(batches=pipeline.Batches(batch_size=32, seed=seed, image_size=96, augment=list(AUGMENT[task])),
                  resources=pipeline.Resources(num_workers=0))
    runs = str(work / "runs")
    try:
        model = demo_model()
        out = DATA / f"{task}-features-96" if per_class is None else work / "f"  # the demo's cache, or the subset's
        t = time.perf_counter()
        features = pipeline.featurize(model, str(root / "train"), str(out), image_size=96)
        featurize_s = time.perf_counter() - t
        if features.reused:  # the cached features were reused: time a fresh featurization for a fair figure
            t = time.perf_counter()
            pipeline.featurize(model, str(root / "train"), str(work / "f-timed"), image_size=96)
            featurize_s = time.perf_counter() - t

        def accuracy(m: Any) -> float:
            return float(pipeline.evaluate(m, str(root / "test"), image_size=96).accuracy)

        t = time.perf_counter()
        staged = pipeline.finetune(model, str(root / "train"), run=pipeline.Run(name="staged", storage=runs), **common,
                                   stages=[stages[0].model_copy(update={"features": features}), *stages[1:]])
        staged_s = time.perf_counter() - t + featurize_s
        t = time.perf_counter()
        images = pipeline.finetune(model, str(root / "train"), stages=stages, run=pipeline.Run(name="images", storage=runs),
                                   **common)
        images_s = time.perf_counter() - t
        kept = pipeline.finetune(staged.stages[0].model, str(root / "train"), run=pipeline.Run(name="kept", storage=runs),
                                 **common,
                                 stages=[stages[1].model_copy(update={"train_bn": False})])
        rows = [
            {"system": f"head alone: fit_head on the features, {head_epochs} epochs", "test_accuracy": accuracy(staged.stages[0].model),
             "seconds": featurize_s + sum(h["seconds"] for h in staged.stages[0].history) + staged.stages[0].startup_s},
            {"system": f"freezeray staged: head on the features, then {', '.join(UNFROZEN)} from images ({tune_epochs} epochs)",
             "test_accuracy": accuracy(staged.model), "seconds": staged_s},
            {"system": "the same schedule from images throughout (fastai's way)", "test_accuracy": accuracy(images.model),
             "seconds": images_s},
            {"system": "freezeray staged with Stage(train_bn=False): BatchNorm statistics kept", "test_accuracy": accuracy(kept.model),
             "seconds": None},
        ]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"settings": {"task": task, "head_epochs": head_epochs, "tune_epochs": tune_epochs, "tune_lr": tune_lr, "unfrozen": list(UNFROZEN),
                         "train_bn": True,
                         "image_size": 96, "batch_size": 32, "per_class": per_class, "train_rows": features.rows,
                         "augment": list(AUGMENT[task])},
            "rows": rows, "featurize_s": featurize_s,
            "accuracy_gain_over_head": rows[1]["test_accuracy"] - rows[0]["test_accuracy"],
            "time_ratio_images_over_staged": images_s / staged_s}


def report(result: dict[str, Any]) -> str:
    return "\n".join([
        table([{**r, "test_accuracy": f"{r['test_accuracy']:.4f}", "seconds": "" if r["seconds"] is None else r["seconds"]}
               for r in result["rows"]], ["system", "test_accuracy", "seconds"]),
        f"staged - head alone: {result['accuracy_gain_over_head']:+.4f} test accuracy (goal > 0); images throughout / "
        f"staged wall time: {result['time_ratio_images_over_staged']:.2f} (goal > 1; featurization, "
        f"{result['featurize_s']:.1f}s, counted in the staged run)",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.staged", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=tuple(AUGMENT), default="surfaces", help="the demo's task (default) or the digits")
    p.add_argument("--head-epochs", type=int, default=30)
    p.add_argument("--tune-epochs", type=int, default=5)
    p.add_argument("--tune-lr", type=float, default=3e-4)
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    result = run(a.head_epochs, a.tune_epochs, a.tune_lr, task=a.task)
    print(report(result))
    print(f"wrote {save_json('staged', result, a.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
