"""Training runs, identified by what defines them.

A run of ``fit_head``, ``finetune`` (each stage of a staged one is a run of its own) or
``sweep`` lives in ``storage/name``. Beside its checkpoints it holds
``freezeray-run.json``: the run's *definition*, what decides what it computes, and the
fingerprint of that definition:

* the model: its graph, frozen set and losses, and the weights training starts from (the
  trainable part's, on features; all of them, on images);
* the data: the features (fingerprint, rows, parts), or the images (URI, rows, listing),
  and the validation data;
* the fine-tune configuration, every field (defaults included);
* the training settings: batch size, shuffling, seed, augmentation, preprocessing, a
  stage's settings, a sweep's search space and ranking.

Calling again with the same ``name``:

* the same definition: the run resumes from its newest good checkpoint (a finished run
  returns as it was; a finished sweep is reused without running a trial);
* another definition: :class:`RunMismatch`, one line naming what changed, before anything
  is trained or written; with ``Run(overwrite=True)`` the old run is deleted and this one starts.

How long a head or fine-tuning run trains (:class:`~pipeline.Stopping`: ``epochs``,
``patience``, ``max_epochs``) is not part of its definition, so calling again with more epochs continues
the same run; nor are the resources (workers, GPUs). A sweep has no such continuation: all
its settings define it. New layers whose weights are drawn at random without a fine-tune
seed start from other weights in every process, so such a model is a new definition each
time: seed it (``FineTuneConfiguration(seed=...)``) to resume it by name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from datetime import datetime, timezone
from typing import Any, Mapping

import torch.fx as fx
from torch import nn

from freezeray import storage
from freezeray.errors import InvalidInput

__all__ = ["RunMismatch", "claim_run", "restart_run", "model_definition", "images_definition", "features_definition",
           "fine_tune_definition", "data_definition", "describe", "RUN_RECORD", "RUN_FORMAT"]

log = logging.getLogger(__name__)

RUN_RECORD = "freezeray-run.json"
RUN_FORMAT = "freezeray.run/1"
_SHOWN = 6  # changes named in a refusal; the rest are counted
_WHAT = {  # keys whose values are hashes, and what they stand for
    "model.graph": "the model's layers",
    "model.frozen": "the frozen set",
    "model.weights": "the weights training starts from",
    "features.parts": "the feature shards",
    "images.listing": "the image files",
    "validation.listing": "the validation files",
}
_HEX = re.compile(r"^[0-9a-f]{32}$")


class RunMismatch(InvalidInput, ValueError):
    """A run name already used, under the same storage, by a run with another definition
    (or by one that left no record of its definition). ``changes`` holds ``(key, old,
    new)`` for each setting that differs."""

    config_path = "training.run_name"

    def __init__(self, run: str, uri: str, changes: list[tuple[str, Any, Any]], unrecorded: bool = False) -> None:
        self.run, self.uri, self.changes, self.unrecorded = run, uri, changes, unrecorded
        super().__init__(self.describe("give another name, or overwrite=True to start it again"))

    def what_changed(self) -> str:
        """The changes, as a short phrase."""
        if self.unrecorded:
            return "it holds files but no record of what defines it (an older freezeray, or something else, wrote them)"
        shown = "; ".join(_change(k, a, b) for k, a, b in self.changes[:_SHOWN])
        more = len(self.changes) - _SHOWN
        return f"{shown}{f'; and {more} more' if more > 0 else ''}"

    def describe(self, hint: str) -> str:
        """The one-line refusal, ending with ``hint`` (what to do, in the caller's terms)."""
        lead = f"run {self.run!r} at {self.uri}"
        if self.unrecorded:
            return f"{lead}: {self.what_changed()}; {hint}"
        return f"{lead} was started with another definition ({self.what_changed()}); {hint}"


def _show(key: str, value: Any) -> str:
    if value is None:
        return "default" if key.startswith("fine_tune.") else "none"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str):
        return value[:8] if _HEX.match(value) else repr(value) if len(value) <= 48 else repr(value[:45] + "...")
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 48 else text[:45] + "..."


def _change(key: str, old: Any, new: Any) -> str:
    if key in _WHAT or (isinstance(old, str) and _HEX.match(old) and isinstance(new, str) and _HEX.match(new)):
        return f"{key} changed ({_WHAT.get(key, 'a fingerprint')})"
    return f"{key} {_show(key, old)} -> {_show(key, new)}"


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys (lists stay values)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _normal(definition: Mapping[str, Any]) -> dict[str, Any]:
    """The definition as it is stored: JSON types, dotted keys."""
    return _flat(json.loads(json.dumps(definition, sort_keys=True, default=str)))


def _fingerprint(normal: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(normal, sort_keys=True).encode()).hexdigest()[:32]


def _diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    keys = [k for k in new if k in old] + [k for k in new if k not in old] + [k for k in old if k not in new]
    return [(k, old.get(k), new.get(k)) for k in dict.fromkeys(keys) if old.get(k) != new.get(k)]


def _read_record(uri: str, storage_options: dict | None) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read_bytes(storage.join(uri, RUN_RECORD), storage_options))
    except FileNotFoundError:
        return None


def _has_files(uri: str, storage_options: dict | None) -> bool:
    """Whether the run folder holds anything besides its record (checkpoints, trials)."""
    if not storage.exists(uri, storage_options):
        return False
    fs, root = storage.filesystem(uri, storage_options)
    names = storage.retrying(lambda: fs.ls(root, detail=False), f"list {uri}")
    return any(n.rstrip("/").rsplit("/", 1)[-1] != RUN_RECORD for n in names)


def _delete(uri: str, storage_options: dict | None) -> None:
    fs, root = storage.filesystem(uri, storage_options)
    storage.retrying(lambda: fs.rm(root, recursive=True), f"delete {uri}")


def claim_run(storage_uri: str, name: str, kind: str, definition: Mapping[str, Any],
              storage_options: dict[str, Any] | None = None, overwrite: bool = False) -> bool:
    """Check the run ``storage_uri/name`` against ``definition``, and record it for a new
    run (or, with ``overwrite``, for this one in place of the old one, which is deleted).

    Returns:
        True when the run exists with this definition (it resumes), False when it starts.

    A record of another definition with nothing else beside it (a run that failed
    before its first checkpoint) is simply replaced.

    Raises:
        RunMismatch: the name holds a run with another definition (or files without a
            record), and not ``overwrite``. Nothing is changed.
    """
    uri = storage.join(storage_uri, name)
    normal = _normal({"kind": kind, **definition})
    fp = _fingerprint(normal)
    found = _read_record(uri, storage_options)
    if found is not None and found.get("fingerprint") == fp:
        return True
    record = {"format": RUN_FORMAT, "kind": kind, "name": name, "fingerprint": fp, "definition": normal,
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    data = json.dumps(record, indent=2, sort_keys=True).encode()
    if _has_files(uri, storage_options):
        if not overwrite:
            changes = _diff(found.get("definition") or {}, normal) if found is not None else []
            raise RunMismatch(name, uri, changes, unrecorded=found is None)
        log.info("run %s: another definition was there; overwrite=True deletes it and starts again", uri)
        _delete(uri, storage_options)
    elif found is not None:  # a run that failed before its first checkpoint: nothing to keep
        storage.write_bytes(storage.join(uri, RUN_RECORD), data, storage_options)
        return False
    try:
        storage.create_bytes(storage.join(uri, RUN_RECORD), data, storage_options)
    except FileExistsError:  # another process claimed the name first: it must agree with us
        return claim_run(storage_uri, name, kind, definition, storage_options, overwrite=False)
    return False


# ---------------------------------------------------------------------------------------
# what defines a run, as data


def _sha(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.hexdigest()[:32]


def model_definition(model: fx.GraphModule, trained: nn.Module | None = None) -> dict[str, Any]:
    """The model's part of a run's definition: its graph (code and module settings),
    frozen set and losses, and the weights training starts from: ``trained``'s (the
    trainable part, for a run on features), else the whole model's."""
    import surgery
    from surgery.fingerprint import hash_tensors

    info = surgery.get_info(model)
    modules = "\n".join(f"{name}:{type(m).__module__}.{type(m).__qualname__}:{m.extra_repr()}"
                        for name, m in sorted(model.named_modules()) if name)
    weights = hashlib.sha256(b"freezeray.run-weights/1\n")
    hash_tensors(weights, (trained if trained is not None else model).state_dict())
    return {"model": {"graph": _sha(model.code.encode(), modules.encode()),
                      "frozen": _sha("\n".join(sorted(info.frozen)).encode()),
                      "weights": weights.hexdigest()[:32], "losses": dict(info.losses)}}


def features_definition(fset: Any) -> dict[str, Any]:
    """A feature set's part of a run's definition: its fingerprint (the frozen graph,
    boundary, preprocessing, dtype and image listing), rows, parts and classes."""
    parts = _sha("\n".join(sorted(fset.shard_uris())).encode())
    return {"fingerprint": fset.fingerprint, "rows": fset.rows, "parts": parts, "classes": list(fset.classes)}


def images_definition(src: Any) -> dict[str, Any]:
    """An image source's part of a run's definition: its URI, rows, classes and listing
    (and the held-out part it is, given as ``(source, split)``)."""
    split = None
    if isinstance(src, tuple):
        src, split = src
    rows = getattr(src, "rows", None)
    listing = getattr(src, "listing_hash", None)
    out = {"uri": src.uri, "rows": None if rows is None else int(rows), "classes": list(src.classes),
           "listing": listing() if callable(listing) else listing}
    if split is not None:
        out["split"] = describe(split)
    return out


def describe(value: Any) -> Any:
    """``value`` as JSON data for a definition: Ray Tune search spaces by their type and
    settings (their ``repr`` holds a memory address), transforms by their ``repr``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): describe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [describe(v) for v in value]
    if type(value).__module__.startswith("ray.tune"):
        return {"type": type(value).__name__, **{k: describe(v) for k, v in sorted(vars(value).items())}}
    return repr(value)


def restart_run(storage_uri: str, name: str, kind: str, definition: Mapping[str, Any],
                storage_options: dict[str, Any] | None = None) -> None:
    """Delete the run ``storage_uri/name`` and record it again with ``definition`` (a run
    that cannot resume, such as an interrupted sweep, starts again)."""
    uri = storage.join(storage_uri, name)
    if storage.exists(uri, storage_options):
        _delete(uri, storage_options)
    claim_run(storage_uri, name, kind, definition, storage_options)


def fine_tune_definition(model: fx.GraphModule) -> dict[str, Any]:
    """Every field of the model's fine-tune configuration, defaults included (a field left
    out is None: "the updater's default")."""
    import surgery
    from surgery.training.config import FineTuneConfiguration

    return (surgery.get_info(model).fine_tune or FineTuneConfiguration()).model_dump(mode="json")


def data_definition(data: Any) -> Any:
    """Validation (or training) data in a definition: a feature set, an image source, a
    fraction held out, or None."""
    if data is None or isinstance(data, (int, float)):
        return data if data is None else {"fraction": float(data)}
    if hasattr(data, "shard_uris"):
        return features_definition(data)
    if hasattr(data, "classes") or isinstance(data, tuple):
        return images_definition(data)
    return {"uri": str(data)}
