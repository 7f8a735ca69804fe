"""The cache speed-up (the seed's claim): featurize once + N epochs of ``fit_head``
against N epochs of training the frozen model end to end from the images with a plain
PyTorch loop, for N = 1, 3, 10, back to back in one process.

    python -m benchmarks.cache [--images 600] [--epochs 1 3 10]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from pipeline import Batches, Resources, Run, Stopping

from .common import (
    RESULTS,
    _Files,
    frozen_lite0,
    save_json,
    start_ray,
    table,
    write_jpegs,
)

DATA = Path(__file__).parent / "data"


def baseline_epochs(model: Any, paths: list[str], labels: list[int], config: Any, epochs: int, batch_size: int,
                    workers: int, threads: int) -> list[float]:
    """End-to-end training of the frozen model from images: each epoch decodes every image
    and runs the frozen backbone again. Returns cumulative seconds after each epoch."""
    import surgery
    from pipeline.decode import normalize
    from surgery.layers import emit_logits

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    info = surgery.get_info(model)
    optimizer = info.fine_tune.build_optimizer(model)
    specs = surgery.loss_specs(model)
    y_all = torch.tensor(labels)
    dataset = _LabelledFiles(paths, config.to_dict(), y_all)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         prefetch_factor=4 if workers else None)
    cumulative, start = [], time.perf_counter()
    model.train()  # frozen BatchNorm and dropout stay in inference mode
    for _ in range(epochs):
        for pixels, y in loader:
            with emit_logits(model):
                loss = surgery.objective(specs, model(normalize(pixels, config)), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        cumulative.append(time.perf_counter() - start)
    return cumulative


class _LabelledFiles(_Files):
    def __init__(self, paths: list[str], config: dict, labels: torch.Tensor) -> None:
        super().__init__(paths, config)
        self.labels = labels

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return super().__getitem__(i), self.labels[i]


def run(images: int = 600, epoch_counts: tuple[int, ...] = (1, 3, 10), batch_size: int = 64, num_workers: int | None = None,
        threads: int | None = None, image_size: int | None = None) -> dict[str, Any]:
    import pipeline

    cpus = os.cpu_count() or 1
    threads = threads or cpus
    root = DATA / f"jpegs-{images}"
    write_jpegs(root, images)
    model, config = frozen_lite0(image_size)
    src = pipeline.read_images(str(root))
    start_ray()
    work = Path(tempfile.mkdtemp(prefix="fr-cache-"))
    try:
        t = time.perf_counter()
        features = pipeline.featurize(model, src, str(work / "features"), preprocessing=config)
        featurize_s = time.perf_counter() - t
        ours = {}
        for n in epoch_counts:
            t = time.perf_counter()
            result = pipeline.fit_head(model, features, stopping=Stopping(epochs=n),
                                       batches=Batches(batch_size=batch_size),
                                       resources=Resources(num_workers=num_workers),
                                       run=Run(storage=str(work / "runs")))
            fit_s = time.perf_counter() - t
            ours[n] = {"featurize_s": featurize_s, "fit_head_s": fit_s, "total_s": featurize_s + fit_s,
                       "epochs_s": sum(h["seconds"] for h in result.history)}
        base = baseline_epochs(model, src.paths, [int(v) for v in src.labels], config, max(epoch_counts), batch_size,
                               workers=min(cpus, 8), threads=threads)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    per_epoch = base[0]
    for n in epoch_counts:
        o = ours[n]
        fixed = o["fit_head_s"] - o["epochs_s"]
        rows.append({"epochs": n, "plain_s": base[n - 1], "freezeray_s": o["total_s"], "featurize_s": o["featurize_s"],
                     "fit_head_s": o["fit_head_s"], "train_startup_s": fixed, "ratio": base[n - 1] / o["total_s"],
                     # the same run with Ray Train's fixed start-up taken out
                     "ratio_without_train_startup": base[n - 1] / (o["total_s"] - fixed)})
    # with a set large enough that the fixed costs vanish, the ratio tends to N * epoch / (epoch + N * head epoch)
    head_epoch = ours[max(epoch_counts)]["epochs_s"] / max(epoch_counts)
    feat_rate = ours[max(epoch_counts)]["featurize_s"]
    return {
        "settings": {"images": images, "epochs": list(epoch_counts), "batch_size": batch_size,
                     "fit_workers": "automatic (local mode)" if num_workers is None else num_workers,
                     "threads": threads, "input_size": list(config.input_size)},
        "rows": rows,
        "plain_epoch_s": per_epoch,
        "head_epoch_s": head_epoch,
        "featurize_s": feat_rate,
        "limit_ratio_10": 10 * per_epoch / (per_epoch + 10 * head_epoch),
    }


def report(result: dict[str, Any]) -> str:
    return "\n".join([
        table(result["rows"], ["epochs", "plain_s", "freezeray_s", "featurize_s", "fit_head_s", "train_startup_s", "ratio",
                               "ratio_without_train_startup"]),
        f"plain epoch {result['plain_epoch_s']:.1f}s, head epoch {result['head_epoch_s']:.2f}s; "
        f"limit for N=10 without fixed costs: {result['limit_ratio_10']:.1f}x (goal >= 8x)",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cache", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=600)
    p.add_argument("--epochs", type=int, nargs="+", default=[1, 3, 10])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--fit-workers", type=int, default=None, help="Ray Train workers (default: automatic, local mode here)")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    result = run(a.images, tuple(a.epochs), a.batch_size, a.fit_workers, image_size=a.image_size)
    print(report(result))
    print(f"wrote {save_json('cache', result, a.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
