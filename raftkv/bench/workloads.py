"""The benchmark's workloads: their names, which ones write, and the keys and values they use.

What each workload sends to each system is in ``raftkv.bench.load`` (one request builder per system).
"""

from __future__ import annotations

import bisect
import random

WORKLOADS = ("put", "get", "stale_get", "mix", "cas", "incr", "mset2", "mset4", "txn")
WRITES = {"put", "cas", "incr", "mset2", "mset4", "txn"}
# The raftkv command each multi-key workload needs; a build without it cannot run that workload.
COMMAND_NEEDED = {"mset2": "MSET", "mset4": "MSET", "txn": "RAFTKV.TXN"}
# Workloads a peer has no single operation for, and why: those points are not run (shown as "-").
NOT_APPLICABLE = {"incr": {"etcd": "etcd has no atomic increment (a read then a compare-and-put txn is two round "
                                   "trips, not the same operation)",
                           "etcd-grpc": "etcd has no atomic increment"}}


def key_name(i: int) -> bytes:
    """The name of key number ``i`` (fixed width, so every key is the same size)."""
    return b"key:%012d" % i


def counter_name(i: int) -> bytes:
    """The name of counter number ``i`` for ``incr`` (not preloaded: a missing counter counts as 0)."""
    return b"ctr:%012d" % i


def applicable(workload: str, system: str) -> bool:
    """Whether ``system`` runs ``workload`` (see ``NOT_APPLICABLE``)."""
    return system not in NOT_APPLICABLE.get(workload, {})


def make_value(size: int) -> bytes:
    """A value of ``size`` bytes."""
    return (b"raftkv-bench-value-0123456789abcdefghijklmnopqrstuvwxyz" * (size // 50 + 1))[:size]


class KeyGen:
    """Uniform or zipfian (s=0.99, ranks scattered over the key space) key indexes."""

    def __init__(self, keyspace: int, dist: str = "uniform", seed: int | None = None) -> None:
        self.n = keyspace
        self.rng = random.Random(seed)
        self.dist = dist
        if dist == "zipf":
            cum, total = [], 0.0
            for r in range(1, keyspace + 1):
                total += 1.0 / r ** 0.99
                cum.append(total)
            self.cum, self.total = cum, total
        elif dist != "uniform":
            raise ValueError(f"unknown key distribution {dist!r}; use uniform or zipf")

    def next(self) -> int:
        if self.dist == "uniform":
            return self.rng.randrange(self.n)
        rank = bisect.bisect_left(self.cum, self.rng.random() * self.total)
        return (min(rank, self.n - 1) * 2654435761) % self.n
