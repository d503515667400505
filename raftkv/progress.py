"""Progress of a long operator command (a shard's keys being copied or deleted): one line, redrawn.

``Progress`` is what the command knows; ``render`` makes it a line (pure); ``ProgressLine`` draws lines on a
terminal, redrawing one line in place at most ``TTY_EVERY_S`` apart, or, on anything else (a log, a pipe, CI),
prints one every ``interval`` seconds, so that a copy of a million keys is not silent for a minute and a log
is not flooded. Time is passed in (``now``) or read from the clock given.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

__all__ = ["Progress", "ProgressLine", "render"]

TTY_EVERY_S = 0.2
LOG_EVERY_S = 10.0
BAR_WIDTH = 24


@dataclass(frozen=True)
class Progress:
    """``done`` of about ``total`` keys (None: unknown) of ``what``, ``nbytes`` of keys and values so far
    (None: not counted, as for deletions), ``elapsed`` seconds since it began."""

    what: str
    done: int
    total: int | None
    nbytes: int | None
    elapsed: float


def render(p: Progress, width: int = BAR_WIDTH) -> str:
    """One line: a bar and a percentage when the total is known (an estimate: capped at 99 % until it is
    ``done``), the keys and bytes so far, and the rate."""
    size = ""
    if p.nbytes is not None:
        rate = p.nbytes / 1e6 / p.elapsed if p.elapsed > 0 else 0.0
        size = f", {p.nbytes / 1e6:.1f} MB, {rate:.1f} MB/s"
    if not p.total:
        return f"{p.what}: {p.done:,} keys{size}"
    frac = min(p.done / p.total, 0.99)
    filled = int(frac * width)
    bar = "#" * filled + "-" * (width - filled)
    return f"[{bar}] {frac * 100:3.0f}% {p.what}: {p.done:,} of ~{p.total:,} keys{size}"


class ProgressLine:
    """Draws ``Progress`` updates on ``stream`` (see module doc); ``clear`` before printing anything else there,
    ``end`` when the operation is over."""

    def __init__(self, stream: TextIO, tty: bool | None = None, interval: float = LOG_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._stream = stream
        self._tty = stream.isatty() if tty is None else tty
        self._every = TTY_EVERY_S if self._tty else interval
        self._clock = clock
        self._last: float | None = None  # when the last line was drawn
        self._shown = False  # a line is on the terminal, not yet ended

    def __call__(self, p: Progress) -> None:
        now = self._clock()
        if self._last is not None and now - self._last < self._every:
            return
        if self._last is None and not self._tty:
            self._last = now  # a log gets its first line after one interval: short copies print nothing
            return
        self._last = now
        if self._tty:
            self._stream.write("\r\x1b[K" + render(p))
            self._shown = True
        else:
            self._stream.write(render(p) + "\n")
        self._stream.flush()

    def clear(self) -> None:
        """Erase the line being redrawn (a terminal), so that a message can be printed in its place."""
        if self._shown:
            self._stream.write("\r\x1b[K")
            self._stream.flush()
            self._shown = False

    def end(self) -> None:
        """The operation is over: erase its line and start the next one afresh."""
        self.clear()
        self._last = None
