"""The surgery ops as data: one schema per ``TransferLearning`` method.

This is the only definition of what a surgery op holds. The builder records these
objects, ``surgery.save`` writes them into the recipe (``model_dump``), ``surgery.load``
and ``apply_ops`` read them back, and the YAML loader parses a config's ``surgery:`` list
into them (from the short form ``- n_out_replace: {vertex: fc2, n_out: 1024}``), so a
problem gets the same message everywhere, with its path.

``phase`` gives the order ``build()`` applies ops in, whatever order they were called
in: removals (keep-connections first), widths, additions, outputs, then freezing and the
fine-tune configuration.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from freezeray.schema import Schema, SchemaError, problems_of

from .training.config import FineTuneConfiguration

__all__ = ["Op", "SetFeatureExtractor", "Freeze", "Unfreeze", "NOutReplace", "NInReplace", "RemoveVertexKeepConnections",
           "RemoveVertexAndConnections", "AddLayer", "AddVertex", "SetOutputs", "FineTuneOp", "SurgeryOp", "OP_NAMES",
           "parse_op", "parse_ops", "from_short_form"]

Vertex = str  # a vertex name (surgery.vertex_names lists them)


def _init_spec(v: Any) -> Any:
    from .layers import parse_weight_init

    parse_weight_init(v)
    return v


class Op(Schema):
    """A recorded surgery op."""

    phase: ClassVar[int] = 0
    op: str

    def vertex_names(self) -> list[str]:
        """The existing vertices this op names (for checks before building)."""
        return []

    def to_dict(self) -> dict[str, Any]:
        """Every field, as JSON-able data (what a recipe stores)."""
        return self.model_dump(mode="json")


class _Vertices(Op):
    vertices: list[Vertex] = Field(min_length=1)  # vertex names

    @field_validator("vertices", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    def vertex_names(self) -> list[str]:
        return list(self.vertices)


class SetFeatureExtractor(_Vertices):
    """Freeze these vertices and all their ancestors (the frozen set becomes exactly that)."""

    phase: ClassVar[int] = 5
    op: Literal["set_feature_extractor"] = "set_feature_extractor"


class Freeze(_Vertices):
    """Freeze just these vertices, on top of the frozen set."""

    phase: ClassVar[int] = 5
    op: Literal["freeze"] = "freeze"


class Unfreeze(_Vertices):
    """Unfreeze these vertices, after every freezing op."""

    phase: ClassVar[int] = 5
    op: Literal["unfreeze"] = "unfreeze"


class SetOutputs(_Vertices):
    """The graph's outputs, in this order."""

    phase: ClassVar[int] = 4
    op: Literal["set_outputs"] = "set_outputs"


class NOutReplace(Op):
    """Give ``vertex`` ``n_out`` outputs and carry the width to the next parametric layers."""

    phase: ClassVar[int] = 2
    op: Literal["n_out_replace"] = "n_out_replace"
    vertex: Vertex
    n_out: int = Field(gt=0)  # the new width
    weight_init: Any = "xavier"  # the vertex's new weights
    fan_out_init: Any = None  # the rebuilt consumers' weights; None: weight_init

    @field_validator("weight_init", "fan_out_init")
    @classmethod
    def _inits(cls, v: Any) -> Any:
        return v if v is None else _init_spec(v)

    def vertex_names(self) -> list[str]:
        return [self.vertex]


class NInReplace(Op):
    """Give ``vertex`` ``n_in`` inputs and fresh weights."""

    phase: ClassVar[int] = 2
    op: Literal["n_in_replace"] = "n_in_replace"
    vertex: Vertex
    n_in: int = Field(gt=0)
    weight_init: Any = "xavier"

    @field_validator("weight_init")
    @classmethod
    def _init(cls, v: Any) -> Any:
        return _init_spec(v)

    def vertex_names(self) -> list[str]:
        return [self.vertex]


class RemoveVertexKeepConnections(Op):
    """Remove ``vertex``; a vertex added with the same name takes its place and inputs."""

    phase: ClassVar[int] = 0
    op: Literal["remove_vertex_keep_connections"] = "remove_vertex_keep_connections"
    vertex: Vertex

    def vertex_names(self) -> list[str]:
        return [self.vertex]


class RemoveVertexAndConnections(Op):
    """Remove ``vertex`` and every vertex computed from it, and drop them from the outputs."""

    phase: ClassVar[int] = 1
    op: Literal["remove_vertex_and_connections"] = "remove_vertex_and_connections"
    vertex: Vertex

    def vertex_names(self) -> list[str]:
        return [self.vertex]


class _Add(Op):
    phase: ClassVar[int] = 3
    name: str  # the new vertex's name
    inputs: list[Vertex] = Field(default_factory=list)  # vertices feeding it; none: a replaced vertex's inputs
    layer_class: str | None = None  # the class of a module a recipe cannot describe (then the spec is None)

    @field_validator("inputs", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    def vertex_names(self) -> list[str]:
        return list(self.inputs)

    def spec(self) -> dict[str, Any] | None:
        raise NotImplementedError  # each add op says which of its fields is the module


def _module_spec(v: Any) -> Any:
    """A layer spec must build (unknown types, losses, activations fail here, with the reason)."""
    from .specs import build_module

    if v is None:
        return v
    if not isinstance(v, dict):
        raise ValueError(f"must be a mapping with a 'type', got {v!r}")
    try:
        build_module(v)
    except TypeError as exc:
        raise ValueError(str(exc)) from None
    return v


class AddLayer(_Add):
    """Add a layer (several inputs are concatenated first, like DL4J's MergeVertex)."""

    op: Literal["add_layer"] = "add_layer"
    layer: dict[str, Any] | None  # surgery.specs.describe(module): {"type": "Dense", "n_out": 256, ...}
    append: bool = False  # on a chain: after the last layer left (DL4J's Builder.addLayer), in call order

    @field_validator("layer")
    @classmethod
    def _spec(cls, v: Any) -> Any:
        return _module_spec(v)

    def spec(self) -> dict[str, Any] | None:
        return self.layer


class AddVertex(_Add):
    """Add a vertex that takes its inputs as separate arguments."""

    op: Literal["add_vertex"] = "add_vertex"
    vertex: dict[str, Any] | None  # surgery.specs.describe(module): {"type": "ElementWise", "op": "add"}

    @model_validator(mode="before")
    @classmethod
    def _older_recipes(cls, data: Any) -> Any:
        if isinstance(data, dict) and "layer" in data and "vertex" not in data:  # recipes before edits.py
            data = {**data, "vertex": data["layer"]}
            del data["layer"]
        return data

    @field_validator("vertex")
    @classmethod
    def _spec(cls, v: Any) -> Any:
        return _module_spec(v)

    def spec(self) -> dict[str, Any] | None:
        return self.vertex


class FineTuneOp(Op):
    """Train the trainable part with ``config``; only its given settings override the model's."""

    phase: ClassVar[int] = 5
    op: Literal["fine_tune_configuration"] = "fine_tune_configuration"
    config: FineTuneConfiguration

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "config": self.config.to_dict()}


SurgeryOp = Annotated[Union[SetFeatureExtractor, Freeze, Unfreeze, SetOutputs, NOutReplace, NInReplace,
                            RemoveVertexKeepConnections, RemoveVertexAndConnections, AddLayer, AddVertex, FineTuneOp],
                      Field(discriminator="op")]
OP_NAMES = ("set_feature_extractor", "freeze", "unfreeze", "n_out_replace", "n_in_replace",
            "remove_vertex_keep_connections", "remove_vertex_and_connections", "add_layer", "add_vertex", "set_outputs")
_ADAPTER: TypeAdapter = TypeAdapter(SurgeryOp)


def from_short_form(item: Any) -> Any:
    """A config's ``{op_name: arguments}`` as the op's fields: a vertex name or a list for
    the freezing ops and ``set_outputs``, a vertex name for the removals, a mapping for
    the rest. Other values pass through (they are validated as ops as they are)."""
    if isinstance(item, dict) and "op" not in item and len(item) == 1:
        (name, args), = item.items()
        if name not in OP_NAMES:
            raise ValueError(f"unknown op {name!r}; valid ops: {', '.join(OP_NAMES)}")
        if name in ("set_feature_extractor", "freeze", "unfreeze", "set_outputs"):
            return {"op": name, "vertices": args}
        if name in ("remove_vertex_keep_connections", "remove_vertex_and_connections"):
            if not isinstance(args, str):
                raise ValueError(f"{name} takes a vertex name, got {args!r}")
            return {"op": name, "vertex": args}
        if not isinstance(args, dict):
            raise ValueError(f"{name} takes a mapping of its arguments, got {args!r}")
        return {"op": name, **args}
    if isinstance(item, dict) and "op" in item and item["op"] not in OP_NAMES + ("fine_tune_configuration",):
        raise ValueError(f"unknown op {item['op']!r}; valid ops: {', '.join(OP_NAMES)}")
    if not isinstance(item, (dict, Op)):
        raise ValueError(f"must be one op as {{op_name: arguments}}, got {item!r}")
    return item


def parse_op(data: Any) -> Op:
    """One op from a recipe dict, a config's short form, or an :class:`Op`.

    Raises:
        SchemaError: naming the problem with its path.
    """
    if isinstance(data, Op):
        return data
    try:
        return _ADAPTER.validate_python(from_short_form(data))
    except ValidationError as exc:
        raise SchemaError("surgery op", problems_of(exc)) from None
    except ValueError as exc:
        raise SchemaError("surgery op", [("", str(exc))]) from None


def parse_ops(items: list[Any]) -> list[Op]:
    """:func:`parse_op` for each item; all problems at once, each with its index."""
    ops, problems = [], []
    for i, item in enumerate(items):
        try:
            ops.append(parse_op(item))
        except SchemaError as exc:
            problems += exc.under(f"[{i}]")
    if problems:
        raise SchemaError("surgery ops", problems)
    return ops
