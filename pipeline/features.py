"""``FeatureSet``: a committed featurization output, opened through its manifest."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch

from freezeray import storage
from freezeray.errors import OutputConflict

from .commit import errors_of, latest
from .manifest import FEATURES_FORMAT, FeaturesManifest, Shard, probe_problem, probe_sample
from .readers import row_side
from .shards import MANIFEST, read_table

__all__ = ["FeatureSet", "FEATURES_FORMAT", "FeatureMismatch", "split_rows"]

class FeatureMismatch(OutputConflict, ValueError):
    """Features made by a different frozen graph than the model they are used with."""


@dataclass(frozen=True)
class FeatureSet:
    """Features of an image set at a model's frozen boundary, as listed by a manifest.

    Example:
        >>> fs = FeatureSet.open("s3://bucket/features/flowers", storage_options)
        >>> fs.rows, fs.classes, fs.feature_shape, fs.dtype
        >>> ds = fs.to_dataset()          # a Ray Dataset of row_id, path, label, features
        >>> x, y = fs.to_tensors()        # small sets only
    """

    uri: str
    manifest: FeaturesManifest = field(repr=False)
    storage_options: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    reused: bool = field(default=False, compare=False)  # featurize found it committed and computed nothing

    @classmethod
    def open(cls, uri: str, storage_options: dict[str, Any] | None = None) -> "FeatureSet":
        """Open the newest committed version of an output. Raises ``FileNotFoundError`` when
        ``uri`` has no manifest (nothing there, or a run that has not committed)."""
        data = latest(uri, storage_options)
        if data is None:
            raise FileNotFoundError(f"no committed feature set at {uri!r} (no {MANIFEST}); run pipeline.featurize first")
        if data.get("format") not in ("freezeray.features/1", "freezeray.features/2", FEATURES_FORMAT):
            raise ValueError(f"{uri!r}: unknown feature-set format {data.get('format')!r}")
        return cls(uri, FeaturesManifest.parse(data), storage_options)

    # -- what the manifest says ---------------------------------------------------------
    @property
    def rows(self) -> int:
        return self.manifest.rows

    @property
    def errors(self) -> int:
        return self.manifest.errors

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.manifest.classes)

    @property
    def feature_columns(self) -> tuple[str, ...]:
        return tuple(self.manifest.feature_columns)

    @property
    def feature_shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(s) for s in self.manifest.feature_shapes)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """Shape of one row's features (the first boundary vertex's, when there are several)."""
        return self.feature_shapes[0]

    @property
    def dtype(self) -> str:
        return self.manifest.dtype

    @property
    def fingerprint(self) -> str:
        return self.manifest.fingerprint

    @property
    def version(self) -> int:
        """1 for the first commit of this output, then one more for each commit that changed it."""
        return self.manifest.version

    @property
    def model_fingerprint(self) -> str:
        return self.manifest.model_fingerprint

    @property
    def boundary(self) -> tuple[str, ...]:
        return tuple(self.manifest.boundary)

    @property
    def shards(self) -> list[Shard]:
        """The planned shards, each with the parts that hold its rows."""
        return list(self.manifest.shards)

    def shard_uris(self) -> list[str]:
        """Every Parquet file of good rows, in shard order."""
        return [storage.join(self.uri, p) for p in self.manifest.part_paths()]

    def errors_table(self) -> pa.Table:
        """(row_id, path, reason) for every input that could not be featurized, in row-id order."""
        return errors_of(self.uri, self.manifest, self.storage_options)

    def to_dict(self) -> dict[str, Any]:
        return self.manifest.to_dict()

    # -- checks -------------------------------------------------------------------------
    def check(self, model: Any) -> None:
        """Refuse these features for a model whose frozen part differs from the one
        that made them.

        Raises:
            FeatureMismatch: naming both fingerprints.
        """
        from surgery import frozen_fingerprint
        from surgery.helper import split

        ours = frozen_fingerprint(model)
        if ours != self.model_fingerprint or split(model).boundary != self.boundary:
            raise FeatureMismatch(
                f"the features at {self.uri!r} were made by a frozen graph with fingerprint {self.model_fingerprint} "
                f"(boundary {', '.join(self.boundary)}), but this model's frozen part has fingerprint {ours} "
                f"(boundary {', '.join(split(model).boundary)}); featurize the images with this model"
            )
        if self.manifest.probe is not None:  # the same graph and weights: does it still compute the same numbers?
            import warnings

            from surgery.fingerprint import probe
            from surgery.graph import example_input

            size = tuple(self.manifest.preprocessing.get("input_size") or ())
            values = probe(split(model).frozen, example_input(size, batch=1), part="model") if size else ()
            problem = probe_problem(probe_sample(values), self.manifest.probe) if size else ""
            if problem:
                warnings.warn(f"the features at {self.uri!r} were made by this frozen graph, but it now computes other "
                              f"values ({problem}): a library upgrade changed its numbers; the head is trained on "
                              "features it would not compute now", stacklevel=2)

    # -- reading ------------------------------------------------------------------------
    def to_dataset(self) -> Any:
        """The shards as a Ray Dataset (row_id, path, label and the feature columns)."""
        import ray.data

        from .runtime import ensure_ray, pyarrow_filesystem

        ensure_ray()
        uris = self.shard_uris()
        if not uris:
            raise ValueError(f"the feature set at {self.uri!r} has no rows")
        fs, _ = pyarrow_filesystem(self.uri, self.storage_options)
        paths = [pyarrow_filesystem(u, self.storage_options)[1] for u in uris]
        return ray.data.read_parquet(paths, filesystem=fs, file_extensions=None)

    def read(self, columns: list[str] | None = None) -> pa.Table:
        """The shards as one Arrow table in row-id order (``columns``: a subset), read
        straight from storage without Ray; for sets that fit in memory."""
        tables = [read_table(u, self.storage_options, columns) for u in self.shard_uris()]
        if not tables:
            raise ValueError(f"the feature set at {self.uri!r} has no rows")
        table = pa.concat_tables(tables)
        order = np.argsort(table.column("row_id").to_numpy(), kind="stable")
        return table.take(pa.array(order))

    def to_tensors(self, max_rows: int = 2_000_000) -> tuple[Any, torch.Tensor]:
        """``(features, labels)`` in row-id order: features one float32 tensor (a tuple
        with several boundary vertices), labels int64. For sets of at most ``max_rows``."""
        if self.rows > max_rows:
            raise ValueError(f"{self.rows} rows is more than max_rows={max_rows}; iterate to_dataset() instead")
        table = self.read()
        feats = tuple(torch.from_numpy(table.column(c).combine_chunks().to_numpy_ndarray().astype(np.float32))
                      for c in self.feature_columns)
        labels = torch.from_numpy(table.column("label").to_numpy().astype(np.int64))
        return (feats[0] if len(feats) == 1 else feats), labels


def split_rows(batch: dict[str, np.ndarray], fraction: float, seed: int, keep: Literal["train", "validation"]) -> dict[str, np.ndarray]:
    """The rows of ``batch`` on one side of a seeded train/validation split by row id (the
    same row always lands on the same side, whatever the batching): ``fraction`` of the
    rows go to ``"validation"``. Works as a Ray Data batch function."""
    mask = row_side(np.asarray(batch["row_id"]), fraction, seed, keep)
    return {k: np.asarray(v)[mask] for k, v in batch.items()}
