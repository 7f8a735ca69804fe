"""The manifest of a committed output (features or predictions): a typed, frozen record
of what one *version* of the output holds. Versions are created exclusively, one after the
other (``_versions/00000001.json``, ...), and ``manifest.json`` is a copy of the newest, so
a version is the commit: readers trust only the files it lists.

Each input shard (a tar, a Parquet file, a manifest fragment, or a group of loose files)
maps to one output shard: one Parquet file of its good rows (``shards/``) and, when it has
any, one of its error rows (``errors/``), both named from the input shard and what the
run computed from it. A shard entry records its input (URI, size, version), so a later
run reuses what did not change.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from freezeray.schema import Schema

__all__ = ["probe_sample", "probe_problem", "ShardPlan", "InputRef", "Part", "Shard", "SourceInfo", "FeaturesManifest", "PredictionsManifest",
           "FEATURES_FORMAT", "PREDICTIONS_FORMAT", "ERRORS", "parse_manifest"]

FEATURES_FORMAT = "freezeray.features/3"
PREDICTIONS_FORMAT = "freezeray.predictions/3"
ERRORS = "errors.parquet"  # every error row, in outputs of format 2 and older


class ShardPlan(Schema):
    """Format 2 and older: input rows (in listing order) cut into shards of ``rows_per_shard``."""

    total: int = Field(ge=0)
    rows_per_shard: int = Field(gt=0)

    @property
    def count(self) -> int:
        return (self.total + self.rows_per_shard - 1) // self.rows_per_shard

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "rows_per_shard": self.rows_per_shard}


class InputRef(Schema):
    """The input an output shard was computed from."""

    uri: str  # the input file; loose files: their list under _inputs/
    kind: Literal["tar", "parquet", "manifest", "files"]
    size: int = -1  # bytes, -1: unknown
    version: str = ""  # ETag or modification time (loose files: a hash of every file's)


class Part(Schema):
    path: str  # relative to the output folder
    rows: int = Field(ge=0)  # good rows in it
    bytes: int = Field(default=0, ge=0)
    node: str | None = None  # the Ray node that wrote it


class Shard(Schema):
    shard: int = Field(ge=0)  # its number: row_id = shard * stride + index in the shard
    name: str = ""  # the input shard's name (a tar's stem; part-00003 for a group of loose files)
    input: InputRef | None = None  # None in format 2 and older
    rows: int = Field(ge=0)  # good rows (in its parts)
    errors: int = Field(ge=0)  # rows that could not be read
    bytes: int = Field(default=0, ge=0)  # of its parts
    parts: list[Part] = Field(default_factory=list)  # format 3: exactly one
    errors_path: str | None = None  # its error rows (row_id, path, reason), when it has any
    nodes: list[str] = Field(default_factory=list)  # the nodes whose actors computed its rows
    label_max: int = -1  # the largest label in it (classes of integer-labelled shards)

    @property
    def path(self) -> str:
        return self.parts[0].path

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class SourceInfo(Schema):
    uri: str  # what the images were read from
    layout: str = ""  # folder, manifest, manifests, webdataset, parquet
    rows: int = 0  # input rows (good and error rows)
    shards: int = 0  # input shards
    listing_hash: str = ""  # format 2 and older


class _Committed(Schema):
    fingerprint: str  # same fingerprint: reused or extended; another: refused (or overwritten)
    version: int = Field(default=1, ge=1)  # 1, 2, ...: each commit of this output
    source: SourceInfo
    rows: int = Field(ge=0)  # good rows in all shards
    errors: int = Field(ge=0)  # error rows
    shards: list[Shard]
    stride: int = Field(default=0, ge=0)  # row_id = shard * stride + index
    errors_file: str | None = None  # format 2 and older: every error row in one file
    plan: ShardPlan | None = None  # format 2 and older
    created: str = ""  # UTC, ISO 8601
    seconds: float | None = None  # wall time of the run that committed it
    images_per_s: float | None = None
    computed: int = 0  # shards this version's run computed (the others were kept from the version before)
    # what the computation gives on a fixed seeded input (a seeded sample of its values): a library upgrade that
    # keeps the fingerprint but changes the numbers is caught by it (pipeline.probe)
    probe: list[float] | None = None
    dropped: int = 0  # shards of the version before that this one no longer holds (their input is gone)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def part_paths(self) -> list[str]:
        return [p.path for s in self.shards for p in s.parts]

    def files(self) -> set[str]:
        """Every file this version lists (relative paths)."""
        out = {p.path for s in self.shards for p in s.parts}
        out |= {s.errors_path for s in self.shards if s.errors_path}
        out |= {s.input.uri for s in self.shards if s.input is not None and s.input.kind == "files"}
        return out


class FeaturesManifest(_Committed):
    format: Literal["freezeray.features/3"] = FEATURES_FORMAT
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
        """A manifest as read from storage; formats 1 and 2 (freezeray 0.1) are read too."""
        return cls.from_dict(_upgrade(data, FEATURES_FORMAT))


class PredictionsManifest(_Committed):
    format: Literal["freezeray.predictions/3"] = PREDICTIONS_FORMAT
    model: str
    model_fingerprint: str  # the whole model's fingerprint
    classes: list[str]

    @classmethod
    def parse(cls, data: dict[str, Any]) -> "PredictionsManifest":
        return cls.from_dict(_upgrade(data, PREDICTIONS_FORMAT))


def _upgrade(data: dict[str, Any], current: str) -> dict[str, Any]:
    """Formats 1 and 2 as format 3: their shards keep their parts, their errors one file."""
    fmt = data.get("format", "")
    if fmt == current:
        return data
    if fmt == "freezeray.features/1":
        data = {**data, "shards": [
            {"shard": i, "rows": s["rows"], "errors": 0, "bytes": s.get("bytes", 0),
             "parts": [{"path": s["path"], "rows": s["rows"], "bytes": s.get("bytes", 0)}]}
            for i, s in enumerate(data.get("shards", []))]}
    elif fmt not in ("freezeray.features/2", "freezeray.predictions/2"):
        return data  # the schema names what is wrong
    plan = data.get("plan") or {}
    return {**data, "format": current, "errors_file": data.get("errors_file") or ERRORS,
            "stride": int(plan.get("rows_per_shard") or 0), "version": 1}


def probe_sample(values: Any, size: int = 256) -> list[float]:
    """A seeded sample of ``size`` of a probe's values (tensors or arrays, concatenated)."""
    import numpy as np

    flat = np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in values]) if len(values) else np.zeros(0)
    if len(flat) > size:
        flat = flat[np.sort(np.random.default_rng(0).choice(len(flat), size, replace=False))]
    return [float(v) for v in flat]


def probe_problem(ours: list[float], theirs: list[float] | None, rtol: float = 1e-3, atol: float = 1e-5) -> str:
    """"" when two probe samples agree within ``max|a - b| <= atol + rtol * max|b|``, else
    what differs (the same tolerance as :data:`surgery.fingerprint.PROBE_TOLERANCE`)."""
    if theirs is None:
        return ""
    if len(ours) != len(theirs):
        return f"its probe has {len(ours)} values where the committed one has {len(theirs)}"
    diff = max((abs(a - b) for a, b in zip(ours, theirs)), default=0.0)
    allowed = atol + rtol * max((abs(b) for b in theirs), default=0.0)
    return "" if diff <= allowed else f"the largest difference on the probe input is {diff:.3g} (allowed {allowed:.3g})"


def parse_manifest(data: dict[str, Any]) -> FeaturesManifest | PredictionsManifest:
    """Either kind of manifest, by its format."""
    if str(data.get("format", "")).startswith("freezeray.predictions/"):
        return PredictionsManifest.parse(data)
    return FeaturesManifest.parse(data)
