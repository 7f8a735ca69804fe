"""``freezeray init IMAGES``: a config for a folder (or manifest) of images.

It inspects the images (classes, counts per class, image sizes, unreadable files) and
writes a commented YAML that ``freezeray run`` accepts as it is:

* the layout: ``IMAGES/<class>/<image>``, or ``IMAGES/train`` and ``IMAGES/test`` (and
  ``IMAGES/validation``) of those, or a ``path,label`` manifest;
* with no test set, a seeded, stratified 80/20 split of the images, written as two
  manifests (``freezeray-train.csv``, ``freezeray-test.csv``) in ``<config name>-out/splits``
  beside the config, or in ``splits`` when given. Nothing is ever written into the image
  folder unless ``splits`` names it: a read-only folder, or one under version control,
  stays as it is. Manifests outside the image folder list absolute paths, and the config
  says ``data.allow_outside: true`` (manifests are otherwise confined to their own folder);
  manifests in the image folder (``splits`` naming it) list relative ones;
* the model's own preprocessing (images whose median side is under 48 px are featurized at
  96 px instead of 224: nothing is lost and it costs five times less), features cut at
  the model's pooling, a new output layer with one unit per class, and training with
  every default (local mode, early stopping on a held-out tenth, the best epoch kept);
* outputs (features, runs, model, report) in ``<config name>-out/`` beside the config,
  never inside the image folder, with an empty ``.freezeray-output`` marker at its root.

The config ends with a digest of what init wrote: init replaces a config it wrote that
nobody edited, and refuses to replace an edited one (or one it did not write) without
``force``. Readability is checked by decoding a sample of the images in full with the
decoder the pipeline uses, so a truncated JPEG counts as unreadable here as it will in
the run.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import random
import re
import statistics
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from freezeray import storage
from freezeray.errors import InvalidInput

__all__ = ["init_config", "inspect_images", "ConfigExists", "HEADS", "SPLIT_FILES"]

log = logging.getLogger(__name__)

# where each zoo family's features are taken and what its classifier vertex is called
HEADS = {
    "efficientnet_lite0": ("global_pool", "classifier"),
    "vgg16": ("fc2", "predictions"),
}
_MARK = "# Written by `freezeray init`"
_DIGEST = re.compile(r"^# init digest: ([0-9a-f]{16})\b.*$\n?", re.M)
_SAMPLE = 500  # images decoded in full for their sizes and readability
SPLIT_FILES = ("freezeray-train.csv", "freezeray-test.csv")


class ConfigExists(InvalidInput, ValueError):
    """The config to write exists and ``force`` was not given: init did not write it, or
    it was edited since."""


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


def _readable(path: str, storage_options: dict[str, Any] | None) -> tuple[int, int] | Exception:
    """The image's size, decoded in full by the pipeline's decoder, or why it cannot be."""
    from freezeray.images import decode_image

    try:
        return decode_image(storage.read_bytes(path, storage_options)).size
    except storage.StorageUnavailable:
        raise
    except Exception as exc:
        return exc


def inspect_images(uri: str, storage_options: dict[str, Any] | None = None, **read: Any) -> dict[str, Any]:
    """Classes, counts, sizes and unreadable files (path, reason) of an image folder or
    manifest; up to :data:`_SAMPLE` images are decoded in full (truncated files fail
    there, as in the run). ``read``: :func:`pipeline.read_images`' options."""
    import pipeline

    src = pipeline.read_images(uri, storage_options, **read)
    labels = src.labels
    counts = {c: int((labels == i).sum()) for i, c in enumerate(src.classes)}
    paths = src.paths
    rng = random.Random(0)
    sample = paths if len(paths) <= _SAMPLE else sorted(rng.sample(paths, _SAMPLE))
    with ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1))) as pool:  # decoding releases the GIL
        found = list(pool.map(lambda p: _readable(p, storage_options), sample))
    sizes = [f for f in found if not isinstance(f, Exception)]
    unreadable = [(p, str(f) or type(f).__name__) for p, f in zip(sample, found) if isinstance(f, Exception)]
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


def _inside(path: str, folder: str) -> bool:
    return (path.rstrip("/") + "/").startswith(folder.rstrip("/") + "/")


def _split(source: Any, where: str, fraction: float = 0.2, seed: int = 0) -> tuple[str, str, bool]:
    """A seeded, stratified split of ``source`` written as two manifests in ``where``.
    Returns their URIs and whether they list files outside ``where`` (absolute paths; a
    manifest inside the image folder lists relative ones). A manifest that already holds
    the same rows is left as it is (a rerun changes nothing)."""
    rows: dict[int, list[str]] = {}
    for path, label in zip(source.paths, source.labels):
        rows.setdefault(int(label), []).append(path)
    base = where.rstrip("/")
    outside = not all(_inside(p, base) for p in source.paths)
    rng = random.Random(seed)
    parts: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    for label, paths in sorted(rows.items()):
        paths = sorted(paths)
        rng.shuffle(paths)
        cut = max(1, round(fraction * len(paths))) if len(paths) > 1 else 0
        for i, p in enumerate(paths):
            listed = p if outside else p[len(base) + 1:]
            parts["test" if i < cut else "train"].append((listed, source.classes[label]))
    written = []
    for (name, items), file in zip(parts.items(), SPLIT_FILES):
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["path", "label"])
        w.writerows(sorted(items))
        uri = storage.join(where, file)
        data = buf.getvalue().encode()
        try:
            same = storage.exists(uri) and storage.read_bytes(uri) == data
            if not same:
                storage.write_bytes(uri, data)
        except OSError as exc:  # a read-only folder (EROFS is not a PermissionError)
            raise PermissionError(f"cannot write the split manifests to {where}: {exc.strerror or exc}; give "
                                  "--splits DIR (a folder you can write) or --output elsewhere") from None
        written.append(uri)
    return written[0], written[1], outside


def _digest(text: str) -> str:
    return hashlib.sha256(_DIGEST.sub("", text).encode()).hexdigest()[:16]


def _replaceable(output: str, force: bool, rerun: bool) -> None:
    """Refuse to replace a config init did not write, or one edited since, unless ``force``."""
    if not os.path.exists(output) or force:
        return
    with open(output) as f:
        text = f.read()
    found = _DIGEST.search(text)
    again = (f"run it as it is with `freezeray run {output}`, or pass --force to replace it" if rerun else
             "pass --force to replace it, or --output to write another config")
    if not text.startswith(_MARK):
        raise ConfigExists(f"{output} exists and was not written by `freezeray init`; {again}")
    if found is None or found.group(1) != _digest(text):
        raise ConfigExists(f"{output} was edited since `freezeray init` wrote it; {again} (your edits would be lost)")


def init_config(images: str, model: str = "efficientnet_lite0", output: str = "run.yaml",
                force: bool = False, splits: str | None = None, rerun: bool = False) -> tuple[str, list[str]]:
    """Inspect ``images`` and write a config for them to ``output`` (outputs in
    ``<name>-out/`` beside it; split manifests, when needed, in ``splits`` or
    ``<name>-out/splits``). Returns the config's path and a few lines describing what was
    found. ``rerun``: the refusal to replace an edited config says how to run it instead.

    Raises:
        FileNotFoundError: no images at ``images``.
        ConfigExists: ``output`` exists and init did not write it or it was edited since
            (without ``force``).
        PermissionError: the split manifests cannot be written where they go.
        ValueError: no images, fewer than two classes, an unknown model, or outputs that
            would land inside the image folder.
    """
    import surgery

    from .steps import OUTPUT_MARKER

    images = os.path.abspath(images) if "://" not in images else images
    output = os.path.abspath(output)
    name = os.path.splitext(os.path.basename(output))[0]
    out = os.path.join(os.path.dirname(output), f"{name}-out")
    if "://" not in images and (_inside(out, images) or _inside(output, images)):
        raise ValueError(f"{output} and its outputs ({out}) would be inside the image folder {images}, where a run "
                         "reads them back as images; give --output CONFIG outside it")
    _replaceable(output, force, rerun)
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
        shown = "; ".join(f"{p.rsplit('/', 1)[-1]}: {r}" for p, r in found["unreadable"][:5])
        more = f"; {len(found['unreadable']) - 5} more" if len(found["unreadable"]) > 5 else ""
        lines.append(f"{len(found['unreadable'])} unreadable files of {found['checked']} checked ({shown}{more}); they "
                     "become error rows, the run goes on")
    if not os.path.exists(out):  # the run's output folder, marked as one (image sources skip it)
        storage.write_bytes(os.path.join(out, OUTPUT_MARKER), b"")
    outside = False
    if "test" not in layout:
        where = os.path.abspath(splits) if splits and "://" not in splits else (splits or os.path.join(out, "splits"))
        train, test, outside = _split(found["source"], where)
        layout = {**layout, "train": train, "test": test}
        lines.append(f"no test set: a seeded, stratified 80/20 split written as {SPLIT_FILES[0]} and {SPLIT_FILES[1]} "
                     f"in {where}")
    ops = _surgery(model, len(found["classes"]))
    image_size = 96 if found["sizes"] and median < 48 else None
    text = _yaml(name, model, ops, layout, image_size, median, out, outside)
    text += f"# init digest: {_digest(text)} (init replaces this file only while it is unedited)\n"
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with open(output, "w") as f:
        f.write(text)
    from .config import load_config

    load_config(output)  # what init writes, run accepts
    return output, lines


def _q(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _yaml(name: str, model: str, ops: list[str], layout: dict[str, str], image_size: int | None, median: float,
          out: str, outside: bool) -> str:
    validation = f"  validation: {_q(layout['validation'])}\n" if "validation" in layout else \
        "  validation: 0.1                # a seeded tenth of train: early stopping and the curves\n"
    size = (f"  image_size: {image_size}                 # your images are small (median side {median:.0f} px): "
            "96 px loses nothing and costs 5x less than 224\n") if image_size else ""
    allow = ("  allow_outside: true             # the split manifests list files of the image folder, outside their own\n"
             if outside else "")
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
{allow}featurize:                         # featurize once at the frozen boundary; reruns reuse the features
  output: {_q(os.path.join(out, 'features'))}
{size}training:                         # the head, on the features: local mode, early stopping, best epoch kept
  mode: head
  storage: {_q(os.path.join(out, 'runs'))}
outputs:
  model: {_q(os.path.join(out, 'model'))}
  report: {_q(os.path.join(out, 'report'))}
"""
