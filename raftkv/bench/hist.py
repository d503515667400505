"""Latency histograms for the load generator: log-bucketed (about 1 % wide, HDR-like), mergeable, JSON-able.

Each worker process records into its own ``Hist``; the parent merges them (``to_dict``/``from_dict`` carry
them across the process boundary).
"""

from __future__ import annotations

import math


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
