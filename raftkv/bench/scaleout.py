"""Shared pieces of the scale-out benchmarks (``bench/rebalance_bench.py``, ``bench/reshard_bench.py``,
``bench/double_bench.py``).

Pure core: counting replicas and leaders per node (:func:`per_node`, :func:`leaders_per_node`) and saying
whether a count is even (:func:`even`: every node within one of every other). Thin edges: run one
``raftkv`` CLI command and time it (:func:`run_cli`), read each shard's key count from every replica
(:func:`keys_per_shard`), and read every preloaded key back (:func:`read_back`).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from raftkv import protocol
from raftkv.bench.workloads import key_name
from raftkv.connection import Connection

__all__ = ["run_cli", "per_node", "leaders_per_node", "even", "keys_per_shard", "read_back"]


# -- pure counting ------------------------------------------------------------------------------------
def per_node(placement: Mapping[int, Sequence[str]], nodes: Iterable[str]) -> dict[str, int]:
    """Node -> how many shard replicas ``placement`` (shard -> its nodes) puts on it; every node in
    ``nodes`` is listed, an empty one with 0 (a node placed on but not in ``nodes`` is listed too)."""
    counts = dict.fromkeys(nodes, 0)
    for members in placement.values():
        for n in members:
            counts[n] = counts.get(n, 0) + 1
    return dict(sorted(counts.items()))


def leaders_per_node(leaders: Mapping[int, str | None], nodes: Iterable[str]) -> dict[str, int]:
    """Node -> how many shards it leads (shard -> leader, None: no leader seen, not counted)."""
    return per_node({s: [n] for s, n in leaders.items() if n is not None}, nodes)


def even(counts: Mapping[str, int]) -> bool:
    """Every node within one of every other (what ``raftkv rebalance`` and ``leaders balance`` aim for)."""
    return not counts or max(counts.values()) - min(counts.values()) <= 1


# -- edges ------------------------------------------------------------------------------------------------
def run_cli(*args: str) -> tuple[float, str]:
    """Run ``python -m raftkv ARGS``; (wall seconds, stdout + stderr). A failure ends the benchmark."""
    t = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "raftkv", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"raftkv {' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return time.monotonic() - t, done.stdout + done.stderr


def keys_per_shard(lc: Any) -> dict[int, list[int]]:
    """Shard -> the distinct key counts its replicas report in ``RAFTKV.STATUS`` (one value: they agree)."""
    keys: dict[int, set[int]] = {}
    for _name, st in lc.shard_views().items():
        for s, sh in st["shards"].items():
            keys.setdefault(int(s), set()).add(sh["keys"])
    return {s: sorted(v) for s, v in sorted(keys.items())}


def read_back(addrs: Sequence[tuple[str, int]], n: int, value: bytes, batch: int = 500,
              retries: int = 5) -> dict[str, int]:
    """Read keys ``0..n-1`` (``key_name``) with ``MGET`` batches (linearizable reads; a node fans a batch out
    to the shards' leaders), one thread per address; returns ``{"ok", "missing", "wrong", "failed"}``
    counts. A batch answered with an error is sent again, up to ``retries`` times."""
    out = {"ok": 0, "missing": 0, "wrong": 0, "failed": 0}
    lock = threading.Lock()
    starts = list(range(0, n, batch))

    def run(addr: tuple[str, int], mine: list[int]) -> None:
        counts = dict.fromkeys(out, 0)
        with Connection(*addr, timeout=30) as conn:
            for start in mine:
                keys = [key_name(i) for i in range(start, min(n, start + batch))]
                for attempt in range(retries + 1):
                    reply = conn.call(b"MGET", *keys)
                    if not isinstance(reply, protocol.ReplyError):
                        break
                    time.sleep(0.2 * (attempt + 1))
                if isinstance(reply, protocol.ReplyError):
                    counts["failed"] += len(keys)
                    continue
                for v in reply:
                    counts["ok" if v == value else "missing" if v is None else "wrong"] += 1
        with lock:
            for k, c in counts.items():
                out[k] += c

    threads = [threading.Thread(target=run, args=(a, starts[i::len(addrs)])) for i, a in enumerate(addrs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out
