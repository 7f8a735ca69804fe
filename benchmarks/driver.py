"""Driver load: what the driver process receives and how much memory it needs while
featurizing, for a narrow and a wide feature row (``efficientnet_lite0`` pooled, 1,280
values, and VGG16's ``block5_pool``, 25,088 values). Goal: the driver handles no feature
bytes, so both are independent of the feature width.

"Received" is the bytes of the per-row summaries the driver reads from Ray Data (every
batch its tracker gets, summed); the feature bytes are the shards the actors wrote, which
is what the driver received before the writes moved to the actors.

    python -m benchmarks.driver [--images 96] [--image-size 224]
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import RESULTS, frozen_lite0, save_json, start_ray, table, write_jpegs
from .scale import DATA, MemorySampler


def _vgg16_block5(image_size: int):
    import surgery
    from surgery.layers import Output

    base = surgery.zoo.load("vgg16")  # random weights: same shapes and FLOPs, nothing downloaded
    model = (surgery.TransferLearning(base).set_feature_extractor("block5_pool")
             .remove_vertex_and_connections("flatten").add_layer("head", Output(4), "block5_pool")
             .set_outputs("head").build())
    return model, surgery.get_info(model).preprocessing.with_size(image_size)


def _summary_bytes(batch: dict[str, Any]) -> int:
    """Bytes of a numpy batch; strings in object columns count their UTF-8 length."""
    import numpy as np

    total = 0
    for v in batch.values():
        v = np.asarray(v)
        total += sum(len(str(x).encode()) for x in v.ravel()) if v.dtype == object else v.nbytes
    return total


def run(images: int = 96, image_size: int = 224) -> dict[str, Any]:
    import importlib

    import pipeline

    fmod = importlib.import_module("pipeline.shards")

    start_ray()
    received = {"bytes": 0}
    add = fmod.Tracker.add

    def counting_add(self, summary):  # what the driver reads from Ray Data, batch by batch
        received["bytes"] += _summary_bytes(summary)
        return add(self, summary)

    rows = []
    fmod.Tracker.add = counting_add
    try:
        runs = (("efficientnet_lite0 global_pool", lambda: frozen_lite0(image_size, random_weights=True), images),
                ("vgg16 block5_pool", lambda: _vgg16_block5(image_size), images),
                ("vgg16 block5_pool", lambda: _vgg16_block5(image_size), 3 * images))
        for label, make, count in runs:
            root = DATA / f"jpegs-{count}"
            write_jpegs(root, count)
            model, config = make()
            out = Path(tempfile.mkdtemp(prefix="fr-driver-"))
            received["bytes"] = 0
            try:
                with MemorySampler() as mem:
                    base_rss = mem._me.memory_info().rss
                    t = time.perf_counter()
                    fset = pipeline.featurize(model, str(root), str(out / "f"), preprocessing=config)
                    seconds = time.perf_counter() - t
                shard_bytes = sum(p.stat().st_size for p in (out / "f").rglob("*.parquet") if "errors" not in p.name)
            finally:
                shutil.rmtree(out, ignore_errors=True)
            rows.append({"model": label, "values_per_row": math.prod(fset.feature_shape), "rows": fset.rows,
                         "seconds": seconds,
                         "feature_bytes_per_row": shard_bytes / fset.rows,
                         "driver_received_bytes_per_row": received["bytes"] / fset.rows,
                         "driver_peak_growth_mb": (mem.driver - base_rss) / 2**20})
    finally:
        fmod.Tracker.add = add
    narrow, wide, more = rows
    return {"settings": {"images": images, "image_size": image_size}, "rows": rows,
            "received_ratio_wide_over_narrow": wide["driver_received_bytes_per_row"] / narrow["driver_received_bytes_per_row"],
            "feature_ratio_wide_over_narrow": wide["feature_bytes_per_row"] / narrow["feature_bytes_per_row"],
            # a difference, not a ratio: a small run's growth can be 0 (the driver already held that much)
            "driver_growth_3x_rows_minus_1x_mb": more["driver_peak_growth_mb"] - wide["driver_peak_growth_mb"]}


def report(result: dict[str, Any]) -> str:
    return "\n".join([
        table(result["rows"], ["model", "values_per_row", "rows", "seconds", "feature_bytes_per_row",
                               "driver_received_bytes_per_row", "driver_peak_growth_mb"]),
        f"wide / narrow: feature bytes {result['feature_ratio_wide_over_narrow']:.1f}x, driver received "
        f"{result['received_ratio_wide_over_narrow']:.2f}x (goal: independent of the width); driver peak growth with 3x "
        f"the rows of the wide model, minus with 1x: {result['driver_growth_3x_rows_minus_1x_mb']:+.0f} MB (the growth is "
        "the model traced and copied for shipping, not rows)",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.driver", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    result = run(a.images, a.image_size)
    print(report(result))
    print(f"wrote {save_json('driver', result, a.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
