"""Rows: the driver's memory and time as the image count grows, and incremental runs.

1. ``featurize`` of N tiny images (8 px JPEGs) in WebDataset tars of 1,000 with a tiny
   model, for N = 10k, 100k and 1M: the driver's peak RSS growth above its RSS before the
   call (sampled every 50 ms) and the wall time. Side by side, in the same run, the version
   before sharded sources (``--baseline``, a git revision checked out in a temporary
   worktree and run in a subprocess) on the same images as a folder of loose files (it
   reads nothing else), at 10k and 100k.
2. Planning alone for 100M rows in 10,000 shards (a synthetic listing, no images): the
   plan, the tracker following the 780,000 slice summaries such a run sends, the manifest,
   and the incremental plan of a rerun with 10% more shards: time and driver memory.
3. Incremental: after the largest run, 10% new shards are added and featurized again; the
   rerun's time over the full run's.

    python -m benchmarks.rows [--sizes 10000 100000 1000000] [--per-tar 1000] [--baseline e581f6e]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from .common import RESULTS, save_json, start_ray, table

ROOT = Path(__file__).resolve().parents[1]

_MODEL = """
import torch
from torch import nn
import surgery
from surgery import PreprocessConfig, TransferLearning
torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
model = TransferLearning(surgery.from_module(net, preprocessing=PreprocessConfig(input_size=(3, 8, 8), crop_pct=1.0))
                         ).set_feature_extractor("3").build()
"""

_BEFORE = _MODEL + """
import json, os, sys, threading, time, psutil, ray, pipeline
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
from ray.data import DataContext
DataContext.get_current().enable_progress_bars = False
me, peak = psutil.Process(), [0]
stop = threading.Event()
def sample():
    while not stop.wait(0.05):
        peak[0] = max(peak[0], me.memory_info().rss)
base = me.memory_info().rss
threading.Thread(target=sample, daemon=True).start()
t = time.perf_counter()
fset = pipeline.featurize(model, sys.argv[1], sys.argv[2])
seconds = time.perf_counter() - t
stop.set()
print(json.dumps({"rows": fset.rows + fset.errors, "seconds": seconds, "growth_mb": (max(peak[0], me.memory_info().rss) - base) / 2**20}))
"""


def _jpegs(count: int = 512) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=80)
        out.append(buf.getvalue())
    return out


def write_tars(root: Path, images: int, per_tar: int, first: int = 0) -> int:
    """``images`` tiny JPEGs in tars of ``per_tar`` samples (``<key>.jpg``); returns the tars written."""
    root.mkdir(parents=True, exist_ok=True)
    blobs = _jpegs()
    count = -(-images // per_tar)
    for t in range(first, first + count):
        path = root / f"{t:05d}.tar"
        if path.exists():
            continue
        with tarfile.open(f"{path}.tmp", "w") as tar:
            for i in range(min(per_tar, images - (t - first) * per_tar)):
                data = blobs[(t * per_tar + i) % len(blobs)]
                info = tarfile.TarInfo(f"{t:05d}{i:06d}.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        os.replace(f"{path}.tmp", path)
    return count


def write_folder(root: Path, images: int) -> None:
    """The same images as loose files, ``<class>/<n>.jpg`` in 10 classes (for the version before)."""
    if (root / ".done").exists():
        return
    blobs = _jpegs()
    for c in range(10):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
    for i in range(images):
        (root / f"c{i % 10}" / f"{i:07d}.jpg").write_bytes(blobs[i % len(blobs)])
    (root / ".done").write_text("")


class _Peak:
    """This process's peak RSS while inside the block, sampled every 50 ms."""

    def __enter__(self) -> "_Peak":
        self.me = psutil.Process()
        self.base = self.peak = self.me.memory_info().rss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.me.memory_info().rss)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.me.memory_info().rss)

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def _tiny_model() -> Any:
    scope: dict[str, Any] = {}
    exec(compile(_MODEL, "<model>", "exec"), scope)  # the one definition both versions run
    return scope["model"]


def _featurize(model: Any, source: str, out: str, progress: Any = None) -> dict[str, Any]:
    import pipeline

    with _Peak() as mem:
        t = time.perf_counter()
        fset = pipeline.featurize(model, source, out, progress=progress)
        seconds = time.perf_counter() - t
    return {"rows": fset.rows + fset.errors, "shards": len(fset.shards), "seconds": seconds,
            "images_per_s": (fset.rows + fset.errors) / seconds, "growth_mb": mem.growth_mb}


def _before(rev: str, folder: Path, out: Path, work: Path) -> dict[str, Any]:
    tree = work / f"before-{rev}"
    if not tree.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev], check=True,
                       capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(tree), "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run([sys.executable, "-c", _BEFORE, str(folder), str(out)], env=env, cwd=tree, check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def planning(shards: int = 10_000, rows_per_shard: int = 10_000, slice_rows: int = 128) -> dict[str, Any]:
    """The driver's work for ``shards * rows_per_shard`` rows without reading an image."""
    from pipeline.manifest import FEATURES_FORMAT, FeaturesManifest, Shard, SourceInfo
    from pipeline.plan import plan_output
    from pipeline.shards import Tracker
    from pipeline.sources import ImageSource, InputShard

    def source(n: int) -> ImageSource:
        return ImageSource("s3://bucket/laion/{00000..%05d}.tar" % (n - 1), "webdataset", (), shards=tuple(
            InputShard(f"s3://bucket/laion/{i:05d}.tar", "tar", 300 << 20, f"etag-{i}") for i in range(n)))

    out: dict[str, Any] = {"rows": shards * rows_per_shard, "shards": shards}
    with _Peak() as mem:
        t = time.perf_counter()
        src = source(shards)
        plan = plan_output(src, "fp", None, 4096, "s3://bucket/features", None)
        out["plan_s"] = time.perf_counter() - t
        t = time.perf_counter()
        tracker = Tracker({s.number: None for s in plan.shards})
        done, per_shard = [], -(-rows_per_shard // slice_rows)
        step = 64  # shards whose slices arrive interleaved, as from concurrent read tasks
        for first in range(0, shards, step):
            group = range(first, min(shards, first + step))
            cols: dict[str, list[Any]] = {k: [] for k in ("shard", "slice", "ranges", "total", "node")}
            for j in range(per_shard):
                for sid in group:
                    lo, hi = j * slice_rows, min(rows_per_shard, (j + 1) * slice_rows) - 1
                    cols["shard"].append(sid)
                    cols["slice"].append(f"{sid:08x}{j:08x}")
                    cols["ranges"].append(f"{lo}-{hi}")
                    cols["total"].append(rows_per_shard if hi == rows_per_shard - 1 else -1)
                    cols["node"].append("node-a")
            batch = {k: np.asarray(v, dtype=object if k in ("slice", "ranges", "node") else np.int64) for k, v in cols.items()}
            done += [d[0] for d in tracker.add(batch)]
        out["tracker_s"] = time.perf_counter() - t
        out["summaries"] = shards * per_shard
        assert len(done) == shards and not tracker.unfinished
        t = time.perf_counter()
        entries = [Shard.from_dict({**s.entry(), "rows": rows_per_shard, "errors": 0, "nodes": ["node-a"]})
                   for s in plan.shards]
        manifest = FeaturesManifest(format=FEATURES_FORMAT, fingerprint="fp", model_fingerprint="m", model="tiny",
                                    boundary=["x"], feature_columns=["features"], feature_shapes=[[1280]],
                                    dtype="float16", preprocessing={}, classes=[],
                                    source=SourceInfo(uri=src.uri, layout="webdataset", rows=out["rows"], shards=shards),
                                    rows=out["rows"], errors=0, shards=entries, stride=plan.stride)
        body = json.dumps(manifest.to_dict())
        out["manifest_s"] = time.perf_counter() - t
        out["manifest_mb"] = len(body) / 2**20
        t = time.perf_counter()
        again = plan_output(source(shards + shards // 10), "fp", manifest, 4096, "s3://bucket/features", None)
        out["incremental_plan_s"] = time.perf_counter() - t
        out["incremental_to_compute"] = len(again.of("compute"))
    out["driver_growth_mb"] = mem.growth_mb
    out["total_s"] = out["plan_s"] + out["tracker_s"] + out["manifest_s"] + out["incremental_plan_s"]
    return out


def run(sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000), per_tar: int = 1000, baseline: str | None = "e581f6e",
        baseline_sizes: tuple[int, ...] = (10_000, 100_000), plan_shards: int = 10_000,
        plan_rows: int = 10_000) -> dict[str, Any]:
    start_ray()
    model = _tiny_model()
    work = Path(tempfile.mkdtemp(prefix="fr-rows-"))
    data = Path(__file__).parent / "data" / "rows"
    result: dict[str, Any] = {"settings": {"sizes": list(sizes), "per_tar": per_tar, "baseline": baseline}, "runs": []}
    try:
        _featurize(model, str(_warm(data, per_tar)), str(work / "warm"))  # Ray Data and the actor pool start once
        largest = max(sizes)
        grown = data / "grown"  # the largest set, linked file by file: the incremental run adds shards to it
        shutil.rmtree(grown, ignore_errors=True)
        for n in sizes:
            tars = data / f"tars-{n}"
            write_tars(tars, n, per_tar)
            if n == largest:
                grown.mkdir(parents=True)
                for f in tars.iterdir():
                    os.link(f, grown / f.name)
                tars = grown
            row = {"version": "now (tar shards)", "images": n, **_featurize(model, str(tars), str(work / f"f-{n}"))}
            result["runs"].append(row)
        if baseline:
            for n in baseline_sizes:
                folder = data / f"folder-{n}"
                write_folder(folder, n)
                row = {"version": f"{baseline} (loose files)", "images": n,
                       **_before(baseline, folder, work / f"b-{n}", work)}
                result["runs"].append(row)
            for n in baseline_sizes:  # the loose-file path of this version, for the same folders
                folder = data / f"folder-{n}"
                result["runs"].append({"version": "now (loose files)", "images": n,
                                       **_featurize(model, str(folder), str(work / f"l-{n}"))})
        full = next(r for r in result["runs"] if r["version"] == "now (tar shards)" and r["images"] == largest)
        extra = max(1, full["shards"] // 10)
        write_tars(grown, extra * per_tar, per_tar, first=full["shards"])
        computed: list[int] = []
        inc = _featurize(model, str(grown), str(work / f"f-{largest}"), progress=lambda s, r, e: computed.append(s))
        result["incremental"] = {"full_s": full["seconds"], "added_shards": extra, "computed_shards": len(computed),
                                 "rerun_s": inc["seconds"], "ratio": inc["seconds"] / full["seconds"]}
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(data / "grown", ignore_errors=True)
        if baseline:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], capture_output=True)
    result["planning"] = planning(plan_shards, plan_rows)
    now = [r for r in result["runs"] if r["version"] == "now (tar shards)"]
    result["growth_largest_minus_smallest_mb"] = now[-1]["growth_mb"] - now[0]["growth_mb"]
    before = [r for r in result["runs"] if r["version"].endswith("(loose files)") and not r["version"].startswith("now")]
    if len(before) >= 2:
        result["before_bytes_per_row"] = (before[-1]["growth_mb"] - before[0]["growth_mb"]) * 2**20 / (
            before[-1]["images"] - before[0]["images"])
    result["now_bytes_per_row"] = result["growth_largest_minus_smallest_mb"] * 2**20 / (now[-1]["images"] - now[0]["images"])
    return result


def _warm(data: Path, per_tar: int) -> Path:
    root = data / "warm"
    write_tars(root, 2 * per_tar, per_tar)
    return root


def report(r: dict[str, Any]) -> str:
    p, inc = r["planning"], r["incremental"]
    lines = [table(r["runs"], ["version", "images", "shards", "seconds", "images_per_s", "growth_mb"]),
             f"driver growth, largest minus smallest run: {r['growth_largest_minus_smallest_mb']:+.1f} MB "
             f"({r['now_bytes_per_row']:.1f} bytes a row; goal: <= 64 MB from 10k to 1M)"]
    if "before_bytes_per_row" in r:
        lines.append(f"the version before: {r['before_bytes_per_row']:.0f} bytes a row")
    lines += [f"planning {p['rows']:,} rows in {p['shards']:,} shards: plan {p['plan_s']:.2f}s, tracker over "
              f"{p['summaries']:,} slice summaries {p['tracker_s']:.1f}s, manifest {p['manifest_s']:.2f}s "
              f"({p['manifest_mb']:.1f} MB), incremental plan {p['incremental_plan_s']:.2f}s; {p['total_s']:.1f}s in all, "
              f"driver growth {p['driver_growth_mb']:.0f} MB (goal: <= 60 s, <= 1 GB)",
              f"incremental: {inc['added_shards']} shards added to {inc['full_s']:.1f}s of work, {inc['computed_shards']} "
              f"computed in {inc['rerun_s']:.1f}s: {inc['ratio']:.3f} of the full run (goal: <= 0.15)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.rows", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--per-tar", type=int, default=1000)
    p.add_argument("--baseline", default="e581f6e", help="git revision to compare with ('' for none)")
    p.add_argument("--baseline-sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    result = run(tuple(a.sizes), a.per_tar, a.baseline or None, tuple(a.baseline_sizes))
    print(report(result))
    print(f"wrote {save_json('rows', result, a.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
