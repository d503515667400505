"""The fault kinds ``--nemesis`` accepts and the seeded schedule of fault windows.

Pure: which kinds exist (the design's fault model, the optional ones, the ones outside it), how a
``--nemesis`` spec reads (:func:`parse_nemesis`), and :func:`make_schedule`, which lays out alternating
quiet and fault windows from a ``random.Random``.  :meth:`jepsen_like.nemesis.Nemesis.run` executes a
schedule, sleeping with :func:`_wait_until`.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable

FAULT_KINDS = ("kill", "pause", "partition", "member", "clock", "slow-disk", "disk", "compaction", "power")
EXTRA_KINDS = ("clock-forward",)
"""Fault kinds outside the design's fault model: named explicitly, never part of ``all``."""
OPTIONAL_KINDS = ("reshard",)
"""Fault kinds inside the fault model that are not (yet) part of ``all``: named explicitly."""
NEMESES = ("none", *FAULT_KINDS, *OPTIONAL_KINDS, *EXTRA_KINDS, "all")


def parse_nemesis(spec: str) -> list[str]:
    """The fault kinds of ``--nemesis``: ``none``, ``all``, or a comma-separated mix such as ``kill,member``."""
    if spec == "none":
        return []
    if spec == "all":
        return list(FAULT_KINDS)
    kinds = [k.strip() for k in spec.split(",") if k.strip()]
    bad = [k for k in kinds if k not in FAULT_KINDS + OPTIONAL_KINDS + EXTRA_KINDS]
    if bad or not kinds:
        raise ValueError(f"unknown nemesis {', '.join(bad) or spec!r}: use none, all, or a comma-separated mix of "
                         f"{', '.join(FAULT_KINDS + OPTIONAL_KINDS + EXTRA_KINDS)}")
    return list(dict.fromkeys(kinds))


def make_schedule(kinds: list[str], duration: float, rng: random.Random, first_quiet: float = 2.0,
                  quiet: tuple[float, float] = (2.0, 4.0), fault: tuple[float, float] = (2.0, 4.0),
                  tail_quiet: float = 1.0) -> list[tuple[float, str, float]]:
    """``[(start, kind, length), ...]`` covering ``duration`` seconds; empty if no kinds.

    Starts after ``first_quiet`` seconds, alternates a fault window with a quiet
    one, and ends every fault ``tail_quiet`` seconds before ``duration``.
    """
    out: list[tuple[float, str, float]] = []
    if not kinds:
        return out
    t = first_quiet
    while True:
        length = rng.uniform(*fault)
        if t + length > duration - tail_quiet:
            length = duration - tail_quiet - t
            if length < 1.0:
                break
        out.append((round(t, 3), rng.choice(kinds), round(length, 3)))
        t += length + rng.uniform(*quiet)
    return out


def _wait_until(clock: Callable[[], float], t: float, stop: threading.Event) -> bool:
    """Sleep until ``clock() >= t``; True if ``stop`` was set first."""
    while True:
        left = t - clock()
        if left <= 0:
            return stop.is_set()
        if stop.wait(min(left, 0.2)):
            return True
