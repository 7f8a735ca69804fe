"""The whole-config check every command runs before Ray starts (and ``freezeray check``).

Beyond the schema (:mod:`jobs.config`), it checks what only the model and the data can
tell, and reports every problem at once, each with its config path:

* the model: a zoo name (with the closest names), or a saved model folder with a recipe;
  the weights reference (``imagenet`` where the zoo has it, or a file that exists and is
  readable; its bytes are not loaded);
* the surgery: every op replayed on the model's graph on PyTorch's ``meta`` device (no
  weights, about a second for VGG16): unknown vertices, widths that do not fit, and an
  output layer whose loss does not fit the data's classes;
* the data: each URI the step reads exists, is readable, holds images, and (for training)
  its classes are found; for ``fit``/``sweep``, the committed train features;
* the outputs: each folder the step writes is writable, and a committed feature set made
  by another model or boundary is named (unless ``featurize.overwrite``).

Nothing here starts Ray (``ray.init`` is never called).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import uuid

import torch
import torch.fx as fx

from freezeray import storage
from freezeray.errors import InvalidInput

from .config import RunConfig

__all__ = ["check_config", "CheckFailed"]

log = logging.getLogger(__name__)


class CheckFailed(InvalidInput, ValueError):
    """Every problem the check found, each with its config path."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source, self.problems = source, problems
        super().__init__(f"{source}: {len(problems)} problem{'s' if len(problems) != 1 else ''}:\n  " + "\n  ".join(problems))


def _resolve(cfg: RunConfig, uri: str | None) -> str | None:
    from .steps import resolve

    return resolve(cfg, uri)


def _skeleton(cfg: RunConfig, problems: list[str]) -> fx.GraphModule | None:
    """The base model's graph on the meta device, or None (with the problem recorded)."""
    import surgery
    from surgery.builder import apply_ops
    from surgery.edits import parse_ops
    from surgery.freeze import apply_frozen_

    opts = cfg.data.storage_options or None
    m = cfg.model
    if m.load is not None:
        uri = _resolve(cfg, m.load)
        try:
            recipe = json.loads(storage.read_bytes(storage.join(uri, "recipe.json"), opts))
        except FileNotFoundError:
            problems.append(f"model.load: no saved model at {uri!r} (no recipe.json); save one with surgery.save "
                            "or `outputs.model` of an earlier run")
            return None
        except Exception as exc:
            problems.append(f"model.load: cannot read {uri!r}: {exc}")
            return None
        if recipe.get("base", {}).get("origin", "zoo") != "zoo":  # an ONNX or from_module graph: the real one
            try:
                return surgery.load(uri, opts)
            except Exception as exc:
                problems.append(f"model.load: the saved model at {uri!r} cannot be rebuilt: {_short(exc)}")
                return None
        try:
            base = recipe["base"]
            model = surgery.zoo.skeleton(base["name"], **dict(base.get("kwargs", {})))
            with torch.device("meta"):
                for stage in recipe.get("stages", []):
                    apply_ops(model, parse_ops(stage))
            names = set(recipe.get("frozen", []))
            apply_frozen_(model, {n for n in model.graph.nodes if n.name in names})
            return model
        except Exception as exc:
            problems.append(f"model.load: the saved model at {uri!r} cannot be rebuilt: {exc}")
            return None
    if m.base == "onnx":  # DL4J's model import: the graph is in the file
        if m.weights is None:
            problems.append("model.weights: model.base 'onnx' needs the .onnx file's path or URI in model.weights")
            return None
        try:
            return surgery.import_onnx(_resolve(cfg, m.weights), storage_options=opts, **m.kwargs)
        except FileNotFoundError:
            problems.append(f"model.weights: ONNX file {_resolve(cfg, m.weights)!r} does not exist")
        except Exception as exc:
            problems.append(f"model.weights: {_short(exc)}")
        return None
    try:
        model = surgery.zoo.skeleton(m.base, **m.kwargs)
    except ValueError as exc:
        close = surgery.zoo.closest(str(m.base), 1)
        message = f"model.base: {_short(exc)}"
        if not close:
            problems.append(message)
            return None
        problems.append(f"{message} (the surgery below was checked against {close[0]})")
        try:
            return surgery.zoo.skeleton(close[0], **m.kwargs)
        except Exception:
            return None
    except TypeError as exc:
        problems.append(f"model.kwargs: {exc}")
        return None
    _check_weights(cfg, problems)
    return model


def _check_weights(cfg: RunConfig, problems: list[str]) -> None:
    from surgery import zoo

    weights = cfg.model.weights
    if weights is None:
        return
    if zoo.is_weights_name(weights):  # "imagenet" or an enum name such as IMAGENET1K_V1
        entry = zoo.zoo_entry(cfg.model.base)
        if entry.imagenet is None:
            problems.append(f"model.weights: zoo model {cfg.model.base!r} has no named weights ({weights!r}); give a path/URI")
        return
    uri = _resolve(cfg, weights)
    try:
        fs, path = storage.filesystem(uri, cfg.data.storage_options or None)
        info = storage.retrying(lambda: fs.info(path), f"look at {uri}")
        if info.get("type") == "directory":
            problems.append(f"model.weights: {uri!r} is a folder; give a safetensors or weights-only torch file")
            return
        with fs.open(path, "rb") as f:  # readable: the first bytes, not the whole file
            f.read(16)
    except FileNotFoundError:
        problems.append(f"model.weights: weights file {uri!r} does not exist")
    except Exception as exc:
        problems.append(f"model.weights: cannot read {uri!r}: {type(exc).__name__}: {exc}")


def _op_paths(cfg: RunConfig) -> dict[int, str]:
    return {id(op): f"surgery[{i}].{op.op}" for i, op in enumerate(cfg.surgery)}


def _check_surgery(cfg: RunConfig, model: fx.GraphModule, problems: list[str]) -> fx.GraphModule | None:
    """Replay the surgery on the meta graph; each op's problems under its path. Ops that
    name unknown vertices are reported and left out, and the rest is still built, so
    widths that do not fit are found in the same pass."""
    from surgery import FineTuneConfiguration, TransferLearning
    from surgery.edits import AddLayer, AddVertex, RemoveVertexKeepConnections
    from surgery.graph import unknown_vertex, vertex_table

    paths = _op_paths(cfg)
    table = vertex_table(model)
    added = {op.name for op in cfg.surgery if isinstance(op, (AddLayer, AddVertex))}
    kept = {op.vertex for op in cfg.surgery if isinstance(op, RemoveVertexKeepConnections)}
    usable = []
    for op in cfg.surgery:
        bad = False
        for name in op.vertex_names():
            if name not in table and (name not in added or isinstance(op, (RemoveVertexKeepConnections,))
                                      or op.op == "remove_vertex_and_connections"):
                problems.append(f"{paths[id(op)]}: {_short(unknown_vertex(name, model, table))}")
                bad = True
        if isinstance(op, (AddLayer, AddVertex)) and op.name in table and op.name not in kept:
            problems.append(f"{paths[id(op)]}: vertex {op.name!r} already exists; remove it first "
                            "(remove_vertex_keep_connections) or pick another name")
            bad = True
        if not bad:
            usable.append(op)
    # a zoo skeleton lives on the meta device; an ONNX graph computes shapes from tensor
    # values (its padding), so it is built for real (it was loaded to be checked anyway)
    real = any(p.device.type != "meta" for p in model.parameters())
    try:
        with contextlib.nullcontext() if real else torch.device("meta"):
            builder = TransferLearning(copy.deepcopy(model))
            if cfg.fine_tune is not None:
                builder.fine_tune_configuration(FineTuneConfiguration.from_dict(cfg.fine_tune.to_dict()))
            built = builder.extend(usable).build()
        return built if len(usable) == len(cfg.surgery) else None
    except Exception as exc:
        problems.append(f"{_culprit(cfg, exc)}: {_short(exc)}")
        return None


def _culprit(cfg: RunConfig, exc: BaseException) -> str:
    """The path of the op an error is about, from the error's data (never its wording):
    the op the builder was applying (``exc.op``), else the last op that names the vertex
    the error concerns (``exc.vertex``; ops that read a vertex before ops that create one
    of that name), else ``surgery``."""
    paths = _op_paths(cfg)
    op = getattr(exc, "op", None)
    if op is not None:
        for o in reversed(cfg.surgery):
            if o == op:
                return paths[id(o)]
    vertex = getattr(exc, "vertex", None)
    if vertex:
        for names_of in (lambda o: o.vertex_names(), lambda o: [getattr(o, "name", None) or ""]):
            for o in reversed(cfg.surgery):
                if vertex in names_of(o):
                    return paths[id(o)]
    return "surgery"


def _short(exc: Exception) -> str:
    """An error for a config's problem list: no hint, no list of every vertex."""
    import re

    text = str(exc).splitlines()[0].split(" Hint:")[0].replace(". Closest:", "; closest:").rstrip(".")
    text = text.replace("is not in the graph of", "is not in")
    match = re.search(r"is not in (\S+)\. Vertices: .*$", text)
    if match:
        text = text[:match.start()] + f"is not in {match.group(1)}; `freezeray summary {match.group(1)}` lists its vertices"
    return text


def _check_output_layer(cfg: RunConfig, model: fx.GraphModule, classes: int, problems: list[str]) -> None:
    from surgery.edits import AddLayer
    from surgery.training.objective import check_targets, loss_specs

    try:
        specs = loss_specs(model)
        check_targets(specs, classes)
    except ValueError as exc:
        path = "surgery"
        for i, op in enumerate(cfg.surgery):
            if isinstance(op, AddLayer) and specs and op.name == specs[0].vertex:
                path = f"surgery[{i}].add_layer.layer"
        problems.append(f"{path}: {exc}")


def _check_images(cfg: RunConfig, key: str, uri: str | None, problems: list[str], labeled: bool) -> int | None:
    """List the images at ``data.<key>``; the number of classes, or None."""
    if uri is None:
        return None
    from .steps import read_source

    try:
        src = read_source(cfg, uri)
    except storage.StorageUnavailable:
        raise  # not a problem of the config: storage is down (the CLI's exit code 3)
    except Exception as exc:
        problems.append(f"data.{key}: {str(exc).splitlines()[0]}")
        return None
    if labeled and not src.labeled:
        problems.append(f"data.{key}: {uri!r} has images without labels; training needs class folders or a label column")
        return None
    if labeled and src.sharded and not src.classes:
        return None  # integer labels of tar shards: their classes are known once the shards are read
    if labeled and len(src.classes) < 2:
        problems.append(f"data.{key}: {uri!r} has {len(src.classes)} class ({', '.join(src.classes)}); "
                        "a classifier needs at least two")
    return len(src.classes)


def _writable(cfg: RunConfig, key: str, uri: str | None, problems: list[str]) -> None:
    """Whether ``uri`` can be written: a probe created and removed at once (in the deepest
    existing folder for local paths, so nothing is left behind)."""
    import tempfile

    if uri is None:
        return
    full = _resolve(cfg, uri)
    opts = cfg.data.storage_options or None
    try:
        if storage.is_local(full):
            probe = full.removeprefix("file://")
            while not os.path.exists(probe):
                probe = os.path.dirname(probe) or "/"
            if not os.path.isdir(probe):
                problems.append(f"{key}: {full!r} is inside {probe!r}, which is a file, not a folder")
                return
            os.rmdir(tempfile.mkdtemp(prefix=".freezeray-check-", dir=probe))
            return
        marker = storage.join(full, f".freezeray-check-{uuid.uuid4().hex[:12]}")
        storage.write_bytes(marker, b"", opts)
        storage.delete(marker, opts)
    except storage.StorageUnavailable:
        raise
    except Exception as exc:
        problems.append(f"{key}: {full!r} is not writable ({type(exc).__name__}: {str(exc).splitlines()[0]})")


def _outside_inputs(cfg: RunConfig, key: str, uri: str | None, problems: list[str]) -> None:
    """An output folder inside an image folder of the config: its files would be listed
    as images (a class of their own) by the next run."""
    if uri is None:
        return
    out = _resolve(cfg, uri).rstrip("/") + "/"
    for name in ("train", "validation", "test", "predict"):
        data = getattr(cfg.data, name)
        if not isinstance(data, str) or data.lower().endswith((".csv", ".parquet")):
            continue  # a manifest lists its files: outputs beside them are never read
        folder = _resolve(cfg, data).rstrip("/") + "/"
        if out.startswith(folder):
            problems.append(f"{key}: {out.rstrip('/')} is inside data.{name} ({folder.rstrip('/')}); an output inside an "
                            "image folder is read back as images; put it beside the folder")
            return


def _check_committed(cfg: RunConfig, model: fx.GraphModule | None, problems: list[str]) -> None:
    """A committed feature set in featurize.output made by another model or boundary."""
    from surgery.helper import split

    if cfg.featurize.output is None or cfg.featurize.overwrite or model is None:
        return
    from surgery.freeze import frozen_nodes

    if not frozen_nodes(model):
        return
    boundary = list(split(model).boundary)
    name = cfg.model.base or ""
    for part in ("train", "validation", "test"):
        uri = storage.join(_resolve(cfg, cfg.featurize.output), part)
        try:
            manifest = json.loads(storage.read_bytes(storage.join(uri, "manifest.json"), cfg.data.storage_options or None))
        except Exception:
            continue
        if manifest.get("boundary") != boundary or (name and manifest.get("model") not in (name, None)):
            problems.append(f"featurize.output: {uri!r} holds features of {manifest.get('model')!r} at "
                            f"{', '.join(manifest.get('boundary') or [])} (fingerprint {manifest.get('fingerprint')}), "
                            f"not of this config's {name or 'model'} at {', '.join(boundary)}; set featurize.overwrite: "
                            "true or choose another output")


def _check_stages(cfg: RunConfig, model: fx.GraphModule, problems: list[str]) -> None:
    """Every vertex a training stage freezes to or unfreezes exists in the built model."""
    from pipeline.stages import stage_problems

    problems.extend(f"training.stages{path}: {_short(exc)}" for path, exc in stage_problems(model, cfg.training.stages or []))


def check_config(cfg: RunConfig, step: str = "run") -> list[str]:
    """Check everything ``step`` will use; raise :class:`CheckFailed` listing every
    problem. Returns what was checked (for ``freezeray check``)."""
    problems: list[str] = []
    checked = []
    model = None
    if step in ("evaluate", "predict"):
        if cfg.outputs.model is None:
            problems.append(f"outputs.model: names no saved model to {step} with")
        elif not storage.exists(storage.join(_resolve(cfg, cfg.outputs.model), "recipe.json"), cfg.data.storage_options or None):
            problems.append(f"outputs.model: no saved model at {_resolve(cfg, cfg.outputs.model)!r}; train one first "
                            "(freezeray fit/finetune/run)")
        checked.append("saved model")
    else:
        skeleton = _skeleton(cfg, problems)
        checked.append("model")
        if skeleton is not None:
            model = _check_surgery(cfg, skeleton, problems) if (cfg.surgery or cfg.fine_tune) else skeleton
            checked.append(f"{len(cfg.surgery)} surgery ops")
        if model is not None and cfg.training.stages and step in ("run", "finetune"):
            _check_stages(cfg, model, problems)
            checked.append(f"{len(cfg.training.stages)} training stages")
    reads = {"run": ("train", "validation", "test", "predict"), "featurize": ("train", "validation", "test"),
             "finetune": ("train", "validation"), "evaluate": ("test",), "predict": ("predict",)}.get(step, ())
    classes = None
    for key in reads:
        uri = getattr(cfg.data, key)
        if isinstance(uri, str):
            n = _check_images(cfg, key, uri, problems, labeled=key != "predict")
            classes = classes if key != "train" else n
            checked.append(f"data.{key}")
    if step in ("fit", "sweep"):
        from pipeline.features import FeatureSet

        try:
            fset = FeatureSet.open(storage.join(_resolve(cfg, cfg.featurize.output or ""), "train"),
                                   cfg.data.storage_options or None)
            classes = len(fset.classes)
        except Exception as exc:
            problems.append(f"featurize.output: {str(exc).splitlines()[0]}; run `freezeray featurize` first")
        checked.append("train features")
    if model is not None and classes and step not in ("featurize",):
        _check_output_layer(cfg, model, classes, problems)
    from .steps import WRITES

    writes = WRITES.get(step, ())
    for key in writes:
        section, field = key.split(".")
        _writable(cfg, key, getattr(getattr(cfg, section), field), problems)
        _outside_inputs(cfg, key, getattr(getattr(cfg, section), field), problems)
    if writes:
        checked.append("outputs")
    if step in ("run", "featurize"):
        _check_committed(cfg, model, problems)
    if problems:
        raise CheckFailed(cfg.source or "the config", problems)
    return checked
