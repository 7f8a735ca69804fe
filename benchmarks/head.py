"""Head training: rows/s of ``fit_head`` in Ray Train's local mode (its default for
features that fit in memory) and with Ray Train workers, against the single-process loop
a user writes over the same features held in memory, at 100k rows; each one's fixed
start-up (reading the features, starting workers, checkpoints) is reported separately.

    python -m benchmarks.head [--rows 100000] [--epochs 2] [--workers 2]
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline import Batches, Resources, Run, Stopping

from .common import RESULTS, frozen_lite0, save_json, start_ray, table


def synthetic_features(model: Any, out: str, rows: int, classes: int = 4, rows_per_shard: int = 8192, seed: int = 0) -> Any:
    """A committed feature set of ``rows`` random features (separable by class) that
    ``fit_head`` accepts for ``model``: the same parts and manifest as featurize."""
    import surgery
    from freezeray import storage
    from pipeline.commit import commit_version
    from pipeline.features import FeatureSet
    from pipeline.manifest import FeaturesManifest, Part, Shard, SourceInfo
    from pipeline.shards import to_arrow_columns, write_table

    parts = surgery.split(model)
    width = 1280
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (classes, width)).astype(np.float32)
    shards = []
    for i in range(math.ceil(rows / rows_per_shard)):
        n = min(rows_per_shard, rows - i * rows_per_shard)
        labels = rng.integers(0, classes, n).astype(np.int32)
        feats = (centres[labels] + rng.normal(0, 2.0, (n, width))).astype(np.float16)
        ids = np.arange(i * rows_per_shard, i * rows_per_shard + n, dtype=np.int64)
        table_ = pa.table(to_arrow_columns({"row_id": ids, "path": np.asarray([f"synthetic/{j}" for j in ids], dtype=object),
                                            "label": labels, "features": feats}))
        path = f"shards/part-{i:05d}-synthetic.parquet"
        size = write_table(storage.join(out, path), table_, None)
        shards.append(Shard(shard=i, name=f"part-{i:05d}", rows=n, errors=0, bytes=size,
                            parts=[Part(path=path, rows=n, bytes=size)]))
    manifest = FeaturesManifest(
        fingerprint="synthetic", model_fingerprint=surgery.frozen_fingerprint(model), model="efficientnet_lite0",
        boundary=list(parts.boundary), feature_columns=["features"], feature_shapes=[[width]], dtype="float16",
        preprocessing=surgery.get_info(model).preprocessing.to_dict(), classes=[f"class{c}" for c in range(classes)],
        source=SourceInfo(uri="synthetic", rows=rows, shards=len(shards)), rows=rows, errors=0, shards=shards,
        stride=rows_per_shard)
    commit_version(out, manifest, None, "features")
    return FeatureSet.open(out)


def single_process(model: Any, features: Any, epochs: int, batch_size: int) -> dict[str, float]:
    """The loop a user writes for features that fit in memory: one process, shuffled batches."""
    import surgery
    from surgery.layers import emit_logits

    t = time.perf_counter()
    x, y = features.to_tensors()
    load_s = time.perf_counter() - t
    head = surgery.split(model).unfrozen
    config = surgery.get_info(model).fine_tune
    optimizer = config.build_optimizer(head)
    specs = surgery.loss_specs(model)
    torch.manual_seed(0)
    head.train()
    t = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(y))
        for i in range(0, len(y), batch_size):
            idx = order[i:i + batch_size]
            with emit_logits(head):
                loss = surgery.objective(specs, head(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    train_s = time.perf_counter() - t
    return {"load_s": load_s, "train_s": train_s, "rows_per_s": epochs * len(y) / train_s, "total_s": load_s + train_s}


def _ours(model: Any, features: Any, epochs: int, batch_size: int, workers: int, storage: str) -> dict[str, Any]:
    import pipeline

    t = time.perf_counter()
    result = pipeline.fit_head(model, features, stopping=Stopping(epochs=epochs),
                               batches=Batches(batch_size=batch_size), resources=Resources(num_workers=workers),
                               run=Run(storage=storage))
    total = time.perf_counter() - t
    epoch_s = sum(h["seconds"] for h in result.history)
    trained = sum(h["rows"] for h in result.history)
    return {"total_s": total, "train_s": epoch_s, "rows_per_s": trained / epoch_s, "startup_s": result.startup_s}


def run(rows: int = 100_000, epochs: int = 2, batch_size: int = 256, workers: int = 2) -> dict[str, Any]:
    model, _ = frozen_lite0()
    work = Path(tempfile.mkdtemp(prefix="fr-head-"))
    try:
        features = synthetic_features(model, str(work / "features"), rows)
        base = single_process(model, features, epochs, batch_size)
        local = _ours(model, features, epochs, batch_size, 0, str(work / "runs"))
        table_rows = [{"system": "single process, features in memory", **base},
                      {"system": "fit_head, local mode (num_workers=0)", **local}]
        if workers:
            start_ray()
            dist = _ours(model, features, epochs, batch_size, workers, str(work / "runs"))
            table_rows.append({"system": f"fit_head, {workers} Ray Train workers", **dist})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = {
        "settings": {"rows": rows, "epochs": epochs, "batch_size": batch_size, "workers": workers, "features": 1280},
        "rows": table_rows,
        "ratio_rows_per_s": local["rows_per_s"] / base["rows_per_s"],
        "ratio_total": base["total_s"] / local["total_s"],
    }
    if workers:
        out["ratio_rows_per_s_workers"] = table_rows[2]["rows_per_s"] / base["rows_per_s"]
    return out


def report(result: dict[str, Any]) -> str:
    lines = [
        table(result["rows"], ["system", "rows_per_s", "train_s", "total_s", "startup_s", "load_s"]),
        f"rows/s ratio fit_head (local mode) / single process: {result['ratio_rows_per_s']:.2f} (goal >= 0.9); "
        f"end-to-end time ratio: {result['ratio_total']:.2f}",
    ]
    if "ratio_rows_per_s_workers" in result:
        lines.append(f"rows/s ratio fit_head ({result['settings']['workers']} workers) / single process: "
                     f"{result['ratio_rows_per_s_workers']:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.head", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    result = run(a.rows, a.epochs, a.batch_size, a.workers)
    print(report(result))
    print(f"wrote {save_json('head', result, a.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
