"""The manifest of a committed output (features or predictions): a typed, frozen record
of what the output holds. It is written last and created exclusively, so it is the
commit: readers trust only the files it lists.

Rows are planned into shards by position in the input listing (:class:`ShardPlan`);
each shard is written as one or more *parts* by the Ray actors that compute its rows,
where they run. A shard entry lists its parts with their rows, bytes and the node that
wrote them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from surgery.schema import Schema

__all__ = ["ShardPlan", "Part", "Shard", "SourceInfo", "FeaturesManifest", "PredictionsManifest", "FEATURES_FORMAT",
           "PREDICTIONS_FORMAT", "ERRORS"]

FEATURES_FORMAT = "freezeray.features/2"
PREDICTIONS_FORMAT = "freezeray.predictions/2"
ERRORS = "errors.parquet"


class ShardPlan(Schema):
    """Input rows (in listing order) cut into shards of ``rows_per_shard``."""

    total: int = Field(ge=0)  # rows in the input listing
    rows_per_shard: int = Field(gt=0)

    @property
    def count(self) -> int:
        return (self.total + self.rows_per_shard - 1) // self.rows_per_shard

    def shard_of(self, positions: Any) -> Any:
        return positions // self.rows_per_shard

    def size(self, i: int) -> int:
        return min(self.rows_per_shard, self.total - i * self.rows_per_shard)

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "rows_per_shard": self.rows_per_shard}


class Part(Schema):
    path: str  # relative to the output folder
    rows: int = Field(ge=0)  # good rows in it
    bytes: int = Field(default=0, ge=0)
    node: str | None = None  # the Ray node whose actor wrote it


class Shard(Schema):
    shard: int = Field(ge=0)  # the planned shard
    rows: int = Field(ge=0)  # good rows (in its parts)
    errors: int = Field(ge=0)  # rows that could not be read (in errors.parquet)
    bytes: int = Field(default=0, ge=0)  # of its parts
    parts: list[Part] = Field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class SourceInfo(Schema):
    uri: str  # the folder or manifest the images were listed from
    layout: str = ""  # "folder" or "manifest"
    rows: int = 0  # images listed
    listing_hash: str = ""  # changes when the listing does


class _Committed(Schema):
    fingerprint: str  # same fingerprint: reused; another: refused (or overwritten)
    source: SourceInfo
    rows: int = Field(ge=0)  # good rows in all shards
    errors: int = Field(ge=0)  # error rows
    errors_file: str = ERRORS
    shards: list[Shard]
    plan: ShardPlan | None = None
    created: str = ""  # UTC, ISO 8601
    seconds: float | None = None  # wall time of the run that committed it
    images_per_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def part_paths(self) -> list[str]:
        return [p.path for s in self.shards for p in s.parts]


class FeaturesManifest(_Committed):
    format: Literal["freezeray.features/2"] = FEATURES_FORMAT
    model_fingerprint: str  # the frozen part that made the features (FeatureSet.check compares it)
    model: str  # the base model's name
    boundary: list[str]  # the vertices whose values are the features, in order
    feature_columns: list[str]
    feature_shapes: list[list[int]]  # per row, per column
    dtype: Literal["float16", "float32"]
    preprocessing: dict[str, Any]
    classes: list[str]

    @classmethod
    def parse(cls, data: dict[str, Any]) -> "FeaturesManifest":
        """A manifest as read from storage; format 1 (one file per shard) is read too."""
        if data.get("format") == "freezeray.features/1":
            data = {**data, "format": FEATURES_FORMAT, "shards": [
                {"shard": i, "rows": s["rows"], "errors": 0, "bytes": s.get("bytes", 0),
                 "parts": [{"path": s["path"], "rows": s["rows"], "bytes": s.get("bytes", 0)}]}
                for i, s in enumerate(data.get("shards", []))]}
        return cls.from_dict(data)


class PredictionsManifest(_Committed):
    format: Literal["freezeray.predictions/2"] = PREDICTIONS_FORMAT
    model: str
    model_fingerprint: str  # the whole model's fingerprint
    classes: list[str]
