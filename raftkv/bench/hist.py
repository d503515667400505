"""Latency histograms for the load generator: log-bucketed (about 1 % wide, HDR-like), mergeable, JSON-able.

Each worker process records into its own ``Hist``; the parent merges them (``to_dict``/``from_dict`` carry
them across the process boundary). ``nearest_rank`` and ``summary_ms`` are the exact counterparts for a
benchmark that keeps every sample.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable


def nearest_rank(sorted_xs: list[float], q: float) -> float:
    """The ``q`` quantile of ascending ``sorted_xs`` by the nearest rank: the smallest sample with at least
    ``q`` of the samples at or below it (never an interpolation, and never low for a small sample)."""
    if not sorted_xs:
        raise ValueError("no samples")
    return sorted_xs[max(1, math.ceil(q * len(sorted_xs))) - 1]


def summary_ms(seconds: Iterable[float], count: str = "writes") -> dict[str, float]:
    """Count, median, p99 (nearest rank) and maximum of latencies in seconds, as milliseconds (0.1 ms)."""
    lat = sorted(seconds)
    if not lat:
        return {count: 0}
    return {count: len(lat), "p50_ms": round(statistics.median(lat) * 1000, 1),
            "p99_ms": round(nearest_rank(lat, 0.99) * 1000, 1), "max_ms": round(lat[-1] * 1000, 1)}


class Hist:
    """Log-bucketed latency histogram: bucket i holds latencies in [e^(i/100), e^((i+1)/100)) microseconds."""

    SCALE = 100.0

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.n = 0

    def record(self, seconds: float) -> None:
        us = seconds * 1e6
        i = int(math.log(us) * self.SCALE) if us > 1.0 else 0
        self.counts[i] = self.counts.get(i, 0) + 1
        self.n += 1

    def merge(self, other: Hist) -> None:
        for i, c in other.counts.items():
            self.counts[i] = self.counts.get(i, 0) + c
        self.n += other.n

    def quantile(self, q: float) -> float | None:
        """Latency in milliseconds at quantile ``q`` (bucket midpoint), None when empty."""
        if not self.n:
            return None
        rank = max(1, math.ceil(q * self.n))
        seen = 0
        for i in sorted(self.counts):
            seen += self.counts[i]
            if seen >= rank:
                return math.exp((i + 0.5) / self.SCALE) / 1000.0
        return None

    def to_dict(self) -> dict:
        return {"n": self.n, "counts": {str(k): v for k, v in self.counts.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> Hist:
        h = cls()
        h.counts = {int(k): v for k, v in d["counts"].items()}
        h.n = d["n"]
        return h
