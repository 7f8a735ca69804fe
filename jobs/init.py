"""``freezeray init IMAGES``: a config for a folder (or manifest) of images.

It inspects the images (classes, counts per class, image sizes, unreadable files) and
writes a commented YAML that ``freezeray run`` accepts as it is:

* the layout: ``IMAGES/<class>/<image>``, or ``IMAGES/train`` and ``IMAGES/test`` (and
  ``IMAGES/validation``) of those, or a ``path,label`` manifest;
* with no test set, a seeded, stratified 80/20 split of the images, written as two
  manifests (``freezeray-train.csv``, ``freezeray-test.csv``) in the image folder, where a
  manifest may point (manifests are confined to their own folder);
* the model's own preprocessing (images whose median side is under 48 px are featurized at
  96 px instead of 224: nothing is lost and it costs five times less), features cut at
  the model's pooling, a new output layer with one unit per class, and training with
  every default (local mode, early stopping on a held-out tenth, the best epoch kept);
* outputs (features, runs, model, report) in ``<config name>-out/`` beside the config.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import random
import statistics
from typing import Any

from surgery import storage

__all__ = ["init_config", "inspect_images", "HEADS"]

log = logging.getLogger(__name__)

# where each zoo family's features are taken and what its classifier vertex is called
HEADS = {
    "efficientnet_lite0": ("global_pool", "classifier"),
    "vgg16": ("fc2", "predictions"),
}
_MARK = "# Written by `freezeray init`"
_SAMPLE = 2000  # images whose headers are read for sizes and readability


def _surgery(model: str, classes: int) -> list[str]:
    """The surgery lines of the config: cut at the features, a new output layer."""
    layer = f"{{type: Output, n_out: {classes}, loss: cross_entropy}}"
    if model in HEADS:
        feature, head = HEADS[model]
        return [f"  - set_feature_extractor: {feature}    # freeze everything up to the features",
                f"  - remove_vertex_keep_connections: {head}",
                f"  - add_layer: {{name: {head}, layer: {layer}}}   # one unit per class"]
    import surgery

    skeleton = surgery.zoo.skeleton(model)
    names = [n.name for n in skeleton.graph.nodes]
    if "flatten" not in names:
        raise ValueError(f"freezeray init knows where to cut {', '.join(HEADS)} and torchvision models with a "
                         f"'flatten' vertex; write the surgery for {model!r} by hand (surgery.summary lists its vertices)")
    after = next(n for n in skeleton.graph.nodes if n.name == "flatten").users
    from surgery.graph import vertex_of

    first = vertex_of(next(iter(after)))
    return ["  - set_feature_extractor: flatten    # freeze everything up to the pooled features",
            f"  - remove_vertex_and_connections: {first}   # the old classifier",
            f"  - add_layer: {{name: head, layer: {layer}, inputs: [flatten]}}   # one unit per class",
            "  - set_outputs: head"]


def inspect_images(uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Classes, counts, sizes and unreadable files of an image folder or manifest."""
    from PIL import Image

    import pipeline

    src = pipeline.read_images(uri, storage_options)
    labels = src.labels
    counts = {c: int((labels == i).sum()) for i, c in enumerate(src.classes)}
    paths = src.paths
    rng = random.Random(0)
    sample = paths if len(paths) <= _SAMPLE else rng.sample(paths, _SAMPLE)
    sizes, unreadable = [], []
    for p in sample:
        try:
            with Image.open(io.BytesIO(storage.read_bytes(p, storage_options))) as img:
                sizes.append(img.size)
        except Exception as exc:
            unreadable.append((p, type(exc).__name__))
    return {"source": src, "classes": list(src.classes), "counts": counts, "images": len(src),
            "sizes": sizes, "checked": len(sample), "unreadable": unreadable}


def _layout(images: str) -> dict[str, str]:
    """train/test/validation URIs of the folder (a split layout, or one folder of classes)."""
    if not storage.exists(images):
        raise FileNotFoundError(f"no images at {images!r}")
    fs, root = storage.filesystem(images)
    if fs.isfile(root):
        return {"train": images}
    children = {c.rstrip("/").rsplit("/", 1)[-1] for c in fs.ls(root, detail=False)}
    if "train" in children and ("test" in children or "validation" in children):
        return {k: storage.join(images, k) for k in ("train", "validation", "test") if k in children}
    return {"train": images}


def _split(images: str, source: Any, fraction: float = 0.2, seed: int = 0) -> tuple[str, str]:
    """A seeded, stratified split written as two manifests in the image folder."""
    rows: dict[int, list[str]] = {}
    root = images.rstrip("/")
    for path, label in zip(source.paths, source.labels):
        rows.setdefault(int(label), []).append(path)
    rng = random.Random(seed)
    parts: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    for label, paths in sorted(rows.items()):
        paths = sorted(paths)
        rng.shuffle(paths)
        cut = max(1, round(fraction * len(paths))) if len(paths) > 1 else 0
        for i, p in enumerate(paths):
            rel = p[len(root) + 1:] if p.startswith(root + "/") else p
            parts["test" if i < cut else "train"].append((rel, source.classes[label]))
    written = []
    for name, items in parts.items():
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["path", "label"])
        w.writerows(sorted(items))
        uri = storage.join(images, f"freezeray-{name}.csv")
        storage.write_bytes(uri, buf.getvalue().encode())
        written.append(uri)
    return written[0], written[1]


def init_config(images: str, model: str = "efficientnet_lite0", output: str = "run.yaml",
                force: bool = False) -> tuple[str, list[str]]:
    """Inspect ``images`` and write a config for them to ``output``. Returns the config's
    path and a few lines describing what was found.

    Raises:
        FileNotFoundError: no images at ``images``.
        ValueError: no images, fewer than two classes, an unknown model, or an existing
            ``output`` not written by ``init`` (without ``force``).
    """
    import surgery

    images = os.path.abspath(images) if "://" not in images else images
    output = os.path.abspath(output)
    if os.path.exists(output) and not force:
        with open(output) as f:
            if not f.read(200).startswith(_MARK):
                raise FileExistsError(f"{output!r} exists and was not written by `freezeray init`; pass --force or "
                                      "another --output")
    try:
        surgery.zoo.skeleton(model)
    except ValueError as exc:
        raise ValueError(str(exc).split(" Hint:")[0]) from None
    layout = _layout(images)
    found = inspect_images(layout["train"])
    if len(found["classes"]) < 2:
        raise ValueError(f"{layout['train']!r} has {len(found['classes'])} class ({', '.join(found['classes'])}): a "
                         "classifier needs at least two; put each class's images in a folder of its own")
    lines = [f"{found['images']} images in {len(found['classes'])} classes: "
             + ", ".join(f"{c} {n}" for c, n in found["counts"].items())]
    sides = sorted(min(s) for s in found["sizes"]) or [0]
    median = statistics.median(sides)
    if found["sizes"]:
        lines.append(f"image sizes (of {found['checked']}): smallest side {sides[0]} to {sides[-1]} px, median {median:.0f}")
    if found["unreadable"]:
        shown = ", ".join(p.rsplit("/", 1)[-1] for p, _ in found["unreadable"][:5])
        lines.append(f"{len(found['unreadable'])} unreadable files of {found['checked']} checked ({shown}); they "
                     "become error rows, the run goes on")
    if "test" not in layout:
        train, test = _split(layout["train"], found["source"])
        layout = {**layout, "train": train, "test": test}
        lines.append("no test set: a seeded, stratified 80/20 split written as freezeray-train.csv and "
                     "freezeray-test.csv in the image folder")
    ops = _surgery(model, len(found["classes"]))
    image_size = 96 if found["sizes"] and median < 48 else None
    name = os.path.splitext(os.path.basename(output))[0]
    out = os.path.join(os.path.dirname(output), f"{name}-out")
    text = _yaml(name, model, ops, layout, image_size, median, out)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with open(output, "w") as f:
        f.write(text)
    from .config import load_config

    load_config(output)  # what init writes, run accepts
    return output, lines


def _q(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _yaml(name: str, model: str, ops: list[str], layout: dict[str, str], image_size: int | None, median: float,
          out: str) -> str:
    validation = f"  validation: {_q(layout['validation'])}\n" if "validation" in layout else \
        "  validation: 0.1                # a seeded tenth of train: early stopping and the curves\n"
    size = (f"  image_size: {image_size}                 # your images are small (median side {median:.0f} px): "
            "96 px loses nothing and costs 5x less than 224\n") if image_size else ""
    return f"""{_MARK} for {layout['train']}. `freezeray run` runs it as it is;
# every setting left out keeps its default (see jobs/configs/ and the README).
name: {name}
model:
  base: {model}
  weights: imagenet                # ImageNet weights (bundled for efficientnet_lite0; others from torchvision)
surgery:                           # DL4J's TransferLearning ops, in any order
{chr(10).join(ops)}
fine_tune: {{seed: 0}}               # Adam, lr 1e-3 by default; seeded so reruns agree
data:
  train: {_q(layout['train'])}
{validation}  test: {_q(layout['test'])}
featurize:                         # featurize once at the frozen boundary; reruns reuse the features
  output: {_q(os.path.join(out, 'features'))}
{size}training:                         # the head, on the features: local mode, early stopping, best epoch kept
  mode: head
  storage: {_q(os.path.join(out, 'runs'))}
outputs:
  model: {_q(os.path.join(out, 'model'))}
  report: {_q(os.path.join(out, 'report'))}
"""
