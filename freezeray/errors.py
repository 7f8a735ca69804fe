"""One error hierarchy. Every failure freezeray expects, and that a user can do something
about, derives from :class:`FreezerayError`; each class carries the exit code the
``freezeray`` command ends with (``jobs.cli`` maps by class, never by name or wording) and,
where known, the config key it concerns (``config_path``, e.g. ``training.run_name``).

The four kinds, by what the user does next::

    FreezerayError
    ├── InvalidInput     2  fix the config, the call or the input    SchemaError, VertexError, ShapeError,
    │                                                                 WeightsError, SourceError, RunMismatch, ...
    ├── DataUnavailable  3  the data or storage is missing or down   StorageUnavailable, CheckpointError
    ├── OutputBusy       4  another job writes the same output       LeaseHeld, LeaseLost
    └── OutputConflict   5  the output holds something else          FeatureMismatch

Each concrete class also derives from the built-in exception it has always been
(``ValueError``, ``RuntimeError``, ``ConnectionError``), so ``except ValueError`` keeps
working. Missing files stay ``FileNotFoundError`` (exit 3) and refusals to replace stay
``FileExistsError`` (exit 5): Python's own classes say it already.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = ["FreezerayError", "InvalidInput", "DataUnavailable", "OutputBusy", "OutputConflict"]


class FreezerayError(Exception):
    """An expected failure: its class says the exit code, ``config_path`` the config key
    it concerns (None when it concerns no single key, or the call came from Python)."""

    exit_code: ClassVar[int] = 1
    config_path: str | None = None


class InvalidInput(FreezerayError):
    """The config, the call's arguments or an input is invalid: fix it and rerun."""

    exit_code = 2


class DataUnavailable(FreezerayError):
    """Data or storage that is missing, unreadable, corrupt or unavailable."""

    exit_code = 3


class OutputBusy(FreezerayError):
    """Another job holds the output's lease (or took it over)."""

    exit_code = 4


class OutputConflict(FreezerayError):
    """The output holds something else (another fingerprint): refused, never mixed."""

    exit_code = 5
