"""The reliability suite's ledger: each case records what it tried, what it checked, the
faults it injected and the rows it accounted for; ``tests/conftest.py`` prints them and the
totals at the end of the run (the README's reliability figures come from there). Also the two checks the
cases share: every row accounted for, and features equal to a direct computation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

import surgery
from freezeray.images import preprocess_bytes
from pipeline.decode import normalize


@dataclass
class Case:
    name: str
    tried: str
    checked: str
    inputs: int  # bad or hostile inputs tried
    faults: int  # faults injected (killed processes, outages, corrupted files)
    rows_checked: int
    rows_lost: int


LEDGER_PROPERTY = "reliability_case"  # the user_properties key a case travels under (tests/conftest.py prints them)


def account(fset, n_inputs: int, expected: np.ndarray | None = None) -> tuple[int, int, int]:
    """(rows checked, rows lost, rows duplicated) of a committed feature set against
    ``n_inputs`` listed images (row ids ``0..n-1``, or ``expected``: tar shards number their
    rows ``shard << 32 | index``): every row id must appear exactly once, as a feature row or
    an error row."""
    ids = np.concatenate([fset.to_dataset().select_columns(["row_id"]).to_pandas()["row_id"].to_numpy(),
                          np.asarray(fset.errors_table().column("row_id").to_pylist(), dtype=np.int64)])
    if expected is not None:
        position = {int(v): i for i, v in enumerate(expected)}
        ids = np.asarray([position.get(int(v), len(expected)) for v in ids], dtype=np.int64)
    counts = np.bincount(ids, minlength=n_inputs) if len(ids) else np.zeros(n_inputs, dtype=np.int64)
    lost = int((counts[:n_inputs] == 0).sum())
    duplicated = int((counts > 1).sum() + (len(counts) > n_inputs))
    return len(ids), lost, duplicated


def direct_features(model, blobs: list[bytes]) -> np.ndarray:
    """The features of each image file's bytes computed without the pipeline: decode,
    preprocess, and the model's frozen part."""
    config = surgery.get_info(model).preprocessing
    pixels = np.stack([preprocess_bytes(b, config) for b in blobs])
    with torch.no_grad():
        return surgery.split(model).frozen.eval()(normalize(torch.from_numpy(pixels), config)).numpy()
