"""The ``counter`` workload: WATCH/MULTI/EXEC increments and the lost-update check (see the package doc)."""

from __future__ import annotations

import random
from typing import Any

from jepsen_like.checker import check
from jepsen_like.models import get_model
from jepsen_like.workloads.base import (
    CLIENT_AUTH,
    NodeConn,
    Worker,
    _Invariant,
    _RotatingGroups,
    _s,
    classify,
)
from raftkv.client import Client, RaftKVError


class CounterWorkload(_RotatingGroups):
    """WATCH/MULTI/EXEC increments of one counter per shard, a fresh set every ``key_period`` s (module doc)."""

    name = "counter"
    prefix = "c"

    def worker(self, process: Any, rng: random.Random, final: bool = False) -> Worker:
        return _CounterWorker(self, process, rng, final)

    def final_ops(self) -> list[tuple[str, Any, Any]]:
        return [("get", k, None) for k in self.used_keys()]

    def check(self, ops: list, timeout_s: float | None) -> dict[str, Any]:
        return {"linearizable": check(ops, get_model("kv"), timeout_s=timeout_s),
                "lost-update": lost_updates(ops)}


def lost_updates(ops: list) -> _Invariant:
    """Every counter's final read (process ``final``) counts at least its acknowledged increments and at most
    those plus its indeterminate ones; a key never read at the end is not judged."""
    acked: dict[Any, int] = {}
    maybe: dict[Any, int] = {}
    final: dict[Any, int] = {}
    for op in ops:
        if op.f == "cas":
            if op.status == "ok" and op.output is True:
                acked[op.key] = acked.get(op.key, 0) + 1
            elif op.status == "info":
                maybe[op.key] = maybe.get(op.key, 0) + 1
        elif op.f == "get" and op.client == "final" and op.status == "ok":
            final[op.key] = int(op.output or 0)
    bad = [(k, v, acked.get(k, 0), maybe.get(k, 0)) for k, v in sorted(final.items())
           if not acked.get(k, 0) <= v <= acked.get(k, 0) + maybe.get(k, 0)]
    return _Invariant(f"{len(final)} counters, {sum(acked.values())} acknowledged increments", bad,
                      lambda b: f"{b[0]}: final value {b[1]}, expected {b[2]} acknowledged increments "
                                f"(+ up to {b[3]} indeterminate)")


class _CounterWorker(Worker):
    """A ``get`` under WATCH, then the ``cas`` that EXECs on it, on one connection to one node."""

    def __init__(self, wl: CounterWorkload, process: Any, rng: random.Random, final: bool) -> None:
        self.wl = wl
        self.rng = rng
        self.final = final
        self.client = Client(cluster=wl.map, timeout=wl.op_timeout, **CLIENT_AUTH) if final else None
        self.nodes = [wl.map.nodes[name].client_addr for name in sorted(wl.map.nodes)]
        self.at = int(process) if isinstance(process, int) else 0
        self.node = NodeConn(self.nodes[self.at % len(self.nodes)], wl.op_timeout)
        self.watched: tuple[str, Any] | None = None  # key and value read under WATCH, awaiting its cas

    def next_op(self, t: float) -> tuple[str, Any, Any]:
        if self.watched is not None:
            key, seen = self.watched
            return "cas", key, [seen, str(int(seen or 0) + 1)]
        return "get", self.rng.choice(self.wl.group_at(t)), None

    def invoke(self, f: str, key: Any, value: Any) -> tuple[str, Any]:
        if self.client is not None:  # final reads: the routing client, no WATCH
            try:
                return "ok", _s(self.client.get(key))
            except Exception as e:  # noqa: BLE001
                return classify(e, write=False), str(e)[:200]
        try:
            if f == "get":
                self.node.call("WATCH", key)
                seen = _s(self.node.call("GET", key))
                self.watched = (key, seen)
                return "ok", seen
            self.watched = None
            self.node.call("MULTI")
            self.node.call("SET", key, value[1])
            if self.node.call("EXEC") is None:
                return "fail", "aborted: the key changed after WATCH"
            return "ok", True
        except Exception as e:  # noqa: BLE001 - every outcome goes into the history
            self.watched = None
            self.node.close()  # a fresh connection: no WATCH or MULTI left behind
            if not isinstance(e, RaftKVError):  # the node did not answer: try the next one
                self.at += 1
                self.node = NodeConn(self.nodes[self.at % len(self.nodes)], self.wl.op_timeout)
            return classify(e, write=f == "cas"), str(e)[:200]

    def close(self) -> None:
        self.node.close()
        if self.client is not None:
            self.client.close()
