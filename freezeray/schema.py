"""The base of every configuration object in freezeray: a frozen pydantic model.

One definition per concept (the fine-tune configuration, the surgery ops, the run
config): the Python API, the YAML loader and the saved recipe all validate through it, so
defaults live in one place and every problem is reported with its path
(``fine_tune.lr: must be >= 0, got -1``).
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from freezeray.errors import InvalidInput

__all__ = ["Schema", "SchemaError", "problems_of", "join_path"]

S = TypeVar("S", bound="Schema")


def join_path(a: str, b: str) -> str:
    """``surgery`` + ``[1].layer`` -> ``surgery[1].layer``; ``data`` + ``train`` -> ``data.train``."""
    if not a or not b:
        return a or b
    return a + b if b.startswith("[") else f"{a}.{b}"


class SchemaError(InvalidInput, ValueError):
    """Invalid settings: every problem, each as ``path: what is wrong``."""

    def __init__(self, what: str, items: list[tuple[str, str]]) -> None:
        self.items = items  # (path, message) pairs; the path may be empty
        self.problems = [f"{p}: {m}" if p else m for p, m in items]
        super().__init__(f"invalid {what}: " + "; ".join(self.problems))

    def under(self, prefix: str) -> list[tuple[str, str]]:
        """The problems with ``prefix`` in front of their paths."""
        return [(join_path(prefix, p), m) for p, m in self.items]


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and (part.startswith("function-") or part in ("tagged-union", "union")):
            continue  # pydantic's own names for validator steps and union branches
        else:
            out = join_path(out, str(part))
    return out


def _message(err: Any) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        return "unknown setting"
    if kind == "missing":
        return "required"
    msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if msg and msg[0].isupper() and not msg[:2].isupper():
        msg = msg[0].lower() + msg[1:]
    if "input" in err and kind not in ("value_error",) and not isinstance(err["input"], (dict, list)):
        msg += f", got {err['input']!r}"
    return msg


def problems_of(exc: ValidationError, prefix: str = "", known: dict[str, list[str]] | None = None) -> list[tuple[str, str]]:
    """``(path, message)`` for each error of a pydantic ``ValidationError`` (a nested
    :class:`SchemaError` keeps its own paths under the error's); an unknown setting also
    lists the valid ones when ``known`` maps its parent path to them."""
    out: list[tuple[str, str]] = []
    for err in exc.errors():
        path = join_path(prefix, _path(tuple(err["loc"])))
        nested = (err.get("ctx") or {}).get("error")
        if isinstance(nested, SchemaError):
            out += nested.under(path)
            continue
        message = _message(err)
        if err["type"] == "extra_forbidden" and known is not None:
            parent = _path(tuple(err["loc"][:-1]))
            if parent in known:
                message += f"; valid settings: {', '.join(known[parent])}"
        out.append((path, message))
    return out


class Schema(BaseModel):
    """A frozen, strict-about-names configuration object with ``to_dict``/``from_dict``
    (what crosses a Ray process boundary and what recipes store).

    ``to_dict`` holds the fields that were given (not the defaults), so an object written
    and read back knows which settings its author chose: merging two configurations
    (DL4J's fine-tune configuration semantics) overrides only those.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True, arbitrary_types_allowed=True)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            known = {"": list(type(self).model_fields)}
            raise SchemaError(type(self).__name__, problems_of(exc, known=known)) from None

    def to_dict(self) -> dict[str, Any]:
        """The settings that were given, as JSON-able data."""
        return self.model_dump(mode="json", exclude_unset=True)

    @classmethod
    def from_dict(cls: type[S], data: dict[str, Any]) -> S:
        """Validate ``data`` (e.g. from :meth:`to_dict`, JSON or YAML).

        Raises:
            SchemaError: naming every problem with its path.
        """
        if not isinstance(data, dict):
            raise SchemaError(cls.__name__, [("", f"must be a mapping, got {type(data).__name__}")])
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise SchemaError(cls.__name__, problems_of(exc, known={"": list(cls.model_fields)})) from None

    def merged(self: S, other: S) -> S:
        """These settings with those given in ``other`` overriding them."""
        return type(self).from_dict({**self.to_dict(), **other.to_dict()})
