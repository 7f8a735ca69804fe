"""What the CLI shows while a run works: one progress bar per stage in a terminal
(images/s or epochs, and the time left), a plain line per finished stage otherwise. Ray's
own logs stay quiet (see :mod:`pipeline.runtime`; ``--verbose`` or ``FREEZERAY_VERBOSE=1``
brings them back)."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

__all__ = ["Reporter"]


class Reporter:
    """The ``progress(step, event)`` callback the steps call: ``start`` (with ``total`` and
    ``unit``), ``rows``, ``epoch_end`` (from training callbacks) and ``end``."""

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None) -> None:
        self.stream: TextIO | None = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self._bars: dict[str, Any] = {}
        self._started: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._units: dict[str, str] = {}

    def __getstate__(self) -> dict[str, Any]:
        # sent to Ray Train workers with a training callback: there it has no terminal and
        # shows nothing (the driver reports the run when it ends)
        return {"stream": None, "tty": False, "_bars": {}, "_started": {}, "_counts": {}, "_units": {}}

    def __call__(self, step: str, event: dict[str, Any]) -> None:
        if self.stream is None:
            return
        kind = event.get("event")
        if kind == "start":
            self._begin(step, event.get("total"), event.get("unit", "items"))
        elif kind == "rows":
            self._advance(step, int(event.get("rows", 0)))
        elif kind == "epoch_end" and event.get("rank", 0) == 0:
            if step not in self._started:
                self._begin(step, None, "epochs")
            self._advance(step, 1)
        elif kind == "end":
            self._finish(step, event)

    def _begin(self, step: str, total: int | None, unit: str) -> None:
        assert self.stream is not None
        self._started[step], self._counts[step], self._units[step] = time.perf_counter(), 0, unit
        if self.tty:
            from tqdm import tqdm

            self._bars[step] = tqdm(total=total, desc=step, unit=unit[:-1] if unit.endswith("s") else unit,
                                    file=self.stream, leave=True, dynamic_ncols=True)

    def _advance(self, step: str, n: int) -> None:
        if step not in self._started:
            return
        self._counts[step] += n
        bar = self._bars.get(step)
        if bar is not None:
            bar.update(n)

    def _finish(self, step: str, event: dict[str, Any]) -> None:
        if step not in self._started:
            return
        seconds = time.perf_counter() - self._started.pop(step)
        bar = self._bars.pop(step, None)
        if bar is not None:
            bar.close()
            return
        count, unit = self._counts.pop(step), self._units.pop(step)
        if event.get("reused"):
            print(f"{step}: reused the cached features", file=self.stream)
        else:
            rate = f", {count / seconds:.1f} {unit}/s" if seconds > 0 and count else ""
            print(f"{step}: {count} {unit} in {seconds:.1f}s{rate}", file=self.stream)

    def close(self) -> None:
        for step in list(self._started):
            self._finish(step, {})
