"""The ``set`` workload: Jepsen's set over APPENDs (see the package doc)."""

from __future__ import annotations

import random
from typing import Any

from jepsen_like import sets
from jepsen_like.workloads.base import (
    ATTEMPT_TIMEOUT_S,
    SET_OP_TIMEOUT_S,
    NodeConn,
    Worker,
    _keys_per_shard,
    classify,
    parse_list,
    read_client,
    routing_client,
)


class SetWorkload:
    """Jepsen's set: unique adds (APPEND of ``"e,"``) and whole-set reads over fixed keys (module doc)."""

    name = "set"
    prefix = "set"
    READ_SHARE = 0.25

    def __init__(self, shardmap: Any, seed: int, keys_per_shard: int = 2, op_timeout: float = SET_OP_TIMEOUT_S,
                 read_any_node: bool = False, read_routing: str = "own",
                 attempt_timeout: float | None = ATTEMPT_TIMEOUT_S, **_: Any) -> None:
        self.map = shardmap
        self.op_timeout = op_timeout
        self.read_any_node = read_any_node
        self.read_routing = read_routing
        self.attempt_timeout = attempt_timeout
        self.keys = _keys_per_shard(shardmap, self.prefix, keys_per_shard)

    def setup(self, rec: Any) -> None:
        """Nothing to set up: the set starts empty."""

    def worker(self, process: Any, rng: random.Random, final: bool = False) -> Worker:
        via = None
        if self.read_any_node and not final:
            names = sorted(self.map.nodes)
            via = names[int(process) % len(names)]
        return _SetWorker(self, process, rng, via)

    def final_ops(self) -> list[tuple[str, Any, Any]]:
        """The whole set through every node, then through the routing client: that linearizable read is the
        last, so an element it misses is lost, and one only a node's read missed is a stale read."""
        return [("read", name, None) for name in sorted(self.map.nodes)] + [("read", None, None)]

    def check(self, ops: list, timeout_s: float | None) -> dict[str, Any]:
        try:
            return {"set": sets.check_set(ops, linearizable=True)}
        except sets.SetHistoryError as e:
            return {"set": sets.SetResult(verdict=sets.UNKNOWN_VERDICT, linearizable=True,
                                          reason=f"cannot check: {e}")}


class _SetWorker(Worker):
    def __init__(self, wl: SetWorkload, process: Any, rng: random.Random, via: str | None) -> None:
        self.wl = wl
        self.process = process
        self.rng = rng
        self.via = via
        self.n = 0
        # Bound to a node (--read-any-node): its adds go through that node too, which forwards them.
        self.client = routing_client(wl, pin=wl.map.nodes[via].client_addr if via else None)
        self.reader = read_client(self.client, wl.read_routing, wl)
        self.nodes: dict[str, NodeConn] = {}

    def next_op(self, t: float) -> tuple[str, Any, Any]:
        if self.rng.random() < self.wl.READ_SHARE:
            return "read", self.via, None
        self.n += 1
        return "add", self.rng.choice(self.wl.keys), f"{self.process}.{self.n}"

    def invoke(self, f: str, key: Any, value: Any) -> tuple[str, Any]:
        try:
            if f == "add":
                self.client.append(key, f"{value},")
                return "ok", None
            if f == "read":
                return "ok", self._read(key)
        except Exception as e:  # noqa: BLE001 - every outcome goes into the history
            if key in self.nodes:
                self.nodes.pop(key).close()  # a fresh connection next time
            return classify(e, write=f == "add"), str(e)[:200]
        raise ValueError(f"unknown set op {f!r}")

    def _read(self, via: str | None) -> list[str]:
        """Every key's elements, key after key, through the routing client or the node ``via``."""
        out: list[str] = []
        for k in self.wl.keys:
            if via is None:
                out += parse_list(self.reader.get(k))
                continue
            if via not in self.nodes:
                self.nodes[via] = NodeConn(self.wl.map.nodes[via].client_addr, self.wl.op_timeout)
            out += parse_list(self.nodes[via].call("GET", k))
        return out

    def close(self) -> None:
        self.client.close()
        if self.reader is not self.client:
            self.reader.close()
        for conn in self.nodes.values():
            conn.close()
