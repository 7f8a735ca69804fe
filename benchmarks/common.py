"""Shared parts of the benchmarks: the machine description, realistic JPEG sets, the
plain-PyTorch baseline a careful user would write, timing, tables and JSON output."""

from __future__ import annotations

import io
import json
import os
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

__all__ = ["machine", "write_jpegs", "baseline_featurize", "timer", "table", "save_json", "frozen_lite0",
           "start_ray", "RESULTS"]

RESULTS = Path(__file__).parent / "results"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import pyarrow
    import ray
    import torchvision

    info: dict[str, Any] = {
        "cpu": _cpu_name(), "cpus": os.cpu_count(), "memory_gb": round(_memory_bytes() / 2**30, 1),
        "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "ray": ray.__version__, "pyarrow": pyarrow.__version__, "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def _jpeg(args: tuple[str, int, int, int, int]) -> None:
    """Write one image: a random crop, scale, flip and colour shift of a sample photo."""
    from PIL import Image, ImageEnhance
    from sklearn.datasets import load_sample_image

    path, i, seed, min_side, max_side = args
    rng = np.random.default_rng([seed, i])  # per image, so any process can write any image
    photo = Image.fromarray(load_sample_image(("china.jpg", "flower.jpg")[int(rng.integers(2))]))
    w, h = photo.size
    cw, ch = int(rng.integers(w // 3, w)), int(rng.integers(h // 3, h))
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = photo.crop((left, top, left + cw, top + ch))
    side = int(rng.integers(min_side, max_side + 1))
    scale = side / max(img.size)
    img = img.resize((max(1, int(img.size[0] * scale)), max(1, int(img.size[1] * scale))), Image.BILINEAR)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    img = ImageEnhance.Color(img).enhance(float(rng.uniform(0.6, 1.4)))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.part")  # written whole or not at all: an interrupted run leaves no empty JPEG to keep
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)


def write_jpegs(root: Path, count: int, classes: int = 4, seed: int = 0, min_side: int = 256, max_side: int = 500) -> list[Path]:
    """``count`` realistic JPEGs (quality 90, 256-500 px): random crops, flips, scales and
    colour shifts of scikit-learn's two sample photos, in ``root/<class>/``, written by
    one process per core. Existing files are kept, so a second call writes nothing."""
    from concurrent.futures import ProcessPoolExecutor

    paths = [root / f"class{i % classes}" / f"{i:06d}.jpg" for i in range(count)]
    todo = [(str(p), i, seed, min_side, max_side) for i, p in enumerate(paths) if not p.exists()]
    if todo:
        with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            list(pool.map(_jpeg, todo, chunksize=32))
    return paths


class _Files(torch.utils.data.Dataset):
    """Decode + resize + crop in DataLoader workers: the same preprocessing freezeray does."""

    def __init__(self, paths: Sequence[str], config: dict) -> None:
        from freezeray.images import PreprocessConfig

        self.paths = list(paths)
        self.config = PreprocessConfig.from_dict(config)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        from freezeray.images import preprocess_bytes

        with open(self.paths[i], "rb") as f:
            return torch.from_numpy(preprocess_bytes(f.read(), self.config))


def baseline_featurize(frozen: torch.nn.Module, paths: Sequence[str], config: dict, out: Path, batch_size: int,
                       workers: int, threads: int, device: str = "cpu") -> dict[str, float]:
    """The loop a careful user writes: a DataLoader with worker processes decoding the
    files, the frozen model under inference_mode, features saved with NumPy. Returns
    timings, split into time waiting for data, model time and write time."""
    from freezeray.images import PreprocessConfig
    from pipeline.decode import normalize

    torch.set_num_threads(threads)
    cfg = PreprocessConfig.from_dict(config)
    loader = torch.utils.data.DataLoader(_Files(paths, config), batch_size=batch_size, num_workers=workers,
                                         persistent_workers=False, prefetch_factor=4 if workers else None,
                                         pin_memory=device == "cuda")
    frozen = frozen.to(device).eval()
    feats, waited, modelled = [], 0.0, 0.0
    start = time.perf_counter()
    t = time.perf_counter()
    with torch.inference_mode():
        for pixels in loader:
            now = time.perf_counter()
            waited += now - t
            feats.append(frozen(normalize(pixels.to(device, non_blocking=True), cfg)).float().cpu().numpy().astype(np.float16))
            t = time.perf_counter()
            modelled += t - now
    w0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "features.npy", np.concatenate(feats))
    wrote = time.perf_counter() - w0
    total = time.perf_counter() - start
    return {"seconds": total, "images_per_s": len(paths) / total, "wait_for_data_s": waited, "model_s": modelled,
            "write_s": wrote}


def frozen_lite0(image_size: int | None = None, random_weights: bool = False):
    """efficientnet_lite0 with its ImageNet weights (or random ones, which cost the same
    to run), frozen to the global pooling, a new head; and its preprocessing (optionally
    at another size)."""
    import surgery
    from surgery.layers import Output

    base = surgery.zoo.load("efficientnet_lite0", weights=None if random_weights else "imagenet")
    model = (surgery.TransferLearning(base).fine_tune_configuration(surgery.FineTuneConfiguration(updater="adam", lr=1e-3, seed=0))
             .set_feature_extractor("global_pool").remove_vertex_keep_connections("classifier")
             .add_layer("classifier", Output(4, loss="cross_entropy")).build())
    config = surgery.get_info(model).preprocessing
    if image_size:
        config = config.with_size(image_size)
    return model, config


def start_ray(num_cpus: int | None = None) -> None:
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=bool(os.environ.get("BENCH_VERBOSE")))
    DataContext.get_current().enable_progress_bars = False


@contextmanager
def timer() -> Iterator[dict[str, float]]:
    box: dict[str, float] = {}
    start = time.perf_counter()
    try:
        yield box
    finally:
        box["seconds"] = time.perf_counter() - start


def table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.2f}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths)))  # noqa: E731
    return "\n".join([line(list(columns)), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def save_json(name: str, data: dict[str, Any], out_dir: Path | None = None) -> Path:
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    payload = {"benchmark": name, "machine": machine(), "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **data}
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path


@dataclass
class Args:
    images: int
    out: Path
