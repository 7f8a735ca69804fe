"""Training checkpoints: what they hold, how they are checked, and where a run resumes.

A checkpoint is a folder of four files:

* ``model.safetensors``: the trained module's state (parameters and buffers);
* ``best.safetensors``: its state at the best epoch so far, when that is not this epoch
  (otherwise ``model.safetensors`` is the best one too);
* ``state.pt``: optimizer and schedule state (a weights-only torch file, never unpickled
  beyond tensors and numbers);
* ``meta.json``, written last: the loop's :class:`~surgery.training.TrainState` without the
  weights (epoch, history, best loss and epoch, patience counter), plus the size and
  SHA-256 of each other file. A checkpoint whose files are missing (partial) or differ
  from their digests (corrupt) is refused with :class:`CheckpointError`, and resuming
  falls back to the newest good checkpoint before it.

On Ray Train workers the folder is handed to ``ray.train.report``, which persists it
under ``storage/name/checkpoint_<time>``. Ray Train's local mode persists nothing, so in
local mode :class:`RunFolder` writes checkpoints to the same place under the same names
itself (keeping the newest two), and a run started again with the same name resumes
from there.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from datetime import datetime
from typing import Any, Callable

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from freezeray import storage
from freezeray.errors import DataUnavailable
from surgery.training import TrainState

__all__ = ["CheckpointError", "checkpoint_files", "read_checkpoint", "read_folder", "write_folder", "RunFolder",
           "resume_from_ray", "CHECKPOINT_FILES"]

log = logging.getLogger(__name__)

CHECKPOINT_FILES = ("model.safetensors", "best.safetensors", "state.pt")
META = "meta.json"


class CheckpointError(DataUnavailable, RuntimeError):
    """A checkpoint that is partial or corrupt, or no usable checkpoint to resume from."""


def _digest(data: bytes) -> dict[str, Any]:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _tensors(state: dict[str, torch.Tensor]) -> bytes:
    return st_save({k: v.detach().cpu().contiguous() for k, v in state.items()})


def checkpoint_files(module: torch.nn.Module, optimizer: Any, scheduler: Any, state: TrainState,
                     extra: dict[str, Any] | None = None) -> dict[str, bytes]:
    """The files of a checkpoint after ``state.epoch - 1``, ``meta.json`` last."""
    files = {"model.safetensors": _tensors(module.state_dict())}
    if state.best_weights is not None and state.best_epoch != state.epoch - 1:
        files["best.safetensors"] = _tensors(state.best_weights)
    buf = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buf)
    files["state.pt"] = buf.getvalue()
    meta = {**state.meta(), **(extra or {}), "files": {name: _digest(data) for name, data in files.items()}}
    files[META] = json.dumps(meta).encode()
    return files


def write_folder(directory: str, files: dict[str, bytes]) -> None:
    """Write checkpoint files into a local folder (``meta.json`` last)."""
    for name, data in files.items():
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)


def read_checkpoint(read: Callable[[str], bytes]) -> tuple[dict[str, torch.Tensor], TrainState, dict[str, Any], dict[str, Any]]:
    """Weights, loop state (with its best weights), optimizer/schedule state and meta of a
    checkpoint whose files ``read(name)`` returns, after checking every file against the
    digests in its ``meta.json``.

    Raises:
        CheckpointError: a file is missing, changed, or does not parse.
    """
    try:
        meta = json.loads(read(META))
    except FileNotFoundError:
        raise CheckpointError(f"{META} is missing (a partial checkpoint)") from None
    except ValueError as exc:
        raise CheckpointError(f"{META} does not parse: {exc}") from None
    files = meta.get("files")
    if not isinstance(files, dict) or "model.safetensors" not in files:
        raise CheckpointError(f"{META} lists no file digests")
    data: dict[str, bytes] = {}
    for name, expected in files.items():
        if name not in CHECKPOINT_FILES:
            raise CheckpointError(f"{META} lists an unknown file {name!r}")
        try:
            data[name] = read(name)
        except FileNotFoundError:
            raise CheckpointError(f"{name} is missing (a partial checkpoint)") from None
        if _digest(data[name]) != expected:
            raise CheckpointError(f"{name} does not match its digest in {META} (corrupt or changed)")
    try:
        weights = dict(st_load(data["model.safetensors"]))
        best = dict(st_load(data["best.safetensors"])) if "best.safetensors" in data else weights
        opt = torch.load(io.BytesIO(data["state.pt"]), map_location="cpu", weights_only=True)
        state = TrainState.from_meta(meta, best if meta.get("best_epoch") is not None else None)
    except Exception as exc:
        raise CheckpointError(f"cannot load: {type(exc).__name__}: {exc}") from None
    return weights, state, opt, meta


def _reader_for_folder(directory: str) -> Callable[[str], bytes]:
    def read(name: str) -> bytes:
        with open(os.path.join(directory, name), "rb") as f:
            return f.read()

    return read


def read_folder(directory: str) -> tuple[dict[str, torch.Tensor], TrainState, dict[str, Any], dict[str, Any]]:
    """:func:`read_checkpoint` on a local folder."""
    return read_checkpoint(_reader_for_folder(directory))


class RunFolder:
    """The folder of one training run, ``storage/name``, on any fsspec URI: its
    checkpoints (``checkpoint_<time>`` folders, named as Ray Train names them, so they
    sort by age), newest first."""

    def __init__(self, storage_uri: str, name: str, storage_options: dict[str, Any] | None = None, keep: int = 2) -> None:
        self.uri = storage.join(storage_uri, name)
        self.storage_options = storage_options
        self.keep = keep

    def checkpoints(self) -> list[str]:
        """URIs of the checkpoint folders, newest first."""
        if not storage.exists(self.uri, self.storage_options):
            return []
        fs, root = storage.filesystem(self.uri, self.storage_options)
        entries = storage.retrying(lambda: fs.ls(root, detail=True, refresh=True), f"list {self.uri}")
        names = sorted((e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory"),
                       reverse=True)
        return [storage.join(self.uri, n) for n in names if n.startswith("checkpoint_")]

    def resume_point(self) -> tuple[tuple[dict, TrainState, dict, dict] | None, str | None, list[str]]:
        """The newest good checkpoint (weights, state, optimizer state, meta), its URI, and
        the problems of newer ones that were skipped. ``(None, None, [])`` for a new run.

        Raises:
            CheckpointError: checkpoints exist but none is usable.
        """
        problems: list[str] = []
        found = self.checkpoints()
        for uri in found:
            try:
                return read_checkpoint(lambda name, _u=uri: storage.read_bytes(storage.join(_u, name), self.storage_options)), uri, problems
            except CheckpointError as exc:
                problems.append(f"{uri}: {exc}")
        if found:
            raise CheckpointError("no usable checkpoint to resume from: " + "; ".join(problems))
        return None, None, problems

    def write(self, files: dict[str, bytes]) -> str:
        """Write a new checkpoint folder (``meta.json`` last), drop all but the newest
        ``keep``, and return its URI."""
        uri = storage.join(self.uri, f"checkpoint_{datetime.now().strftime('%Y-%m-%d_%H-%M-%S.%f')}")
        for name, data in files.items():
            storage.write_bytes(storage.join(uri, name), data, self.storage_options)
        for old in self.checkpoints()[self.keep:]:
            fs, path = storage.filesystem(old, self.storage_options)
            storage.retrying(lambda _p=path: fs.rm(_p, recursive=True), f"delete {old}")
        return uri


def resume_from_ray(checkpoint: Any) -> tuple[tuple, str, list[str]]:
    """Ray Train's latest checkpoint or, if it is partial or corrupt, the newest good
    checkpoint of the same run before it.

    Raises:
        CheckpointError: no good checkpoint is left.
    """
    import ray.train
    from pyarrow.fs import FileSelector, FileType

    problems: list[str] = []
    try:
        with checkpoint.as_directory() as d:
            return read_folder(d), checkpoint.path, problems
    except CheckpointError as exc:
        problems.append(f"{checkpoint.path}: {exc}")
    fs, latest = checkpoint.filesystem, checkpoint.path.rstrip("/")
    run_dir, name = latest.rsplit("/", 1)
    older = sorted((i.path for i in fs.get_file_info(FileSelector(run_dir))
                    if i.type == FileType.Directory and i.base_name.startswith("checkpoint_") and i.base_name < name),
                   reverse=True)
    for path in older:
        try:
            with ray.train.Checkpoint(path, filesystem=fs).as_directory() as d:
                return read_folder(d), path, problems
        except CheckpointError as exc:
            problems.append(f"{path}: {exc}")
    raise CheckpointError("no usable checkpoint to resume from: " + "; ".join(problems))
