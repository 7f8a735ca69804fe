"""The CLI's own failures: an exit code, one line in the CLI's terms (config keys and
command-line options, never Python arguments), and detail lines. The steps raise them
where they know what the user can do about a failure; :func:`jobs.cli.classify` turns
every other expected failure into one."""

from __future__ import annotations

__all__ = ["CliError"]


class CliError(Exception):
    """An expected failure, with its exit code and the lines to print."""

    def __init__(self, code: int, message: str, details: list[str] | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.details = code, message, details or []
