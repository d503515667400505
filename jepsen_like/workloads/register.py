"""The ``register`` workload (see the package doc)."""

from __future__ import annotations

import random
from typing import Any

from jepsen_like.checker import check
from jepsen_like.models import get_model
from jepsen_like.workloads.base import (
    ATTEMPT_TIMEOUT_S,
    NodeConn,
    Worker,
    _s,
    classify,
    pinned_node,
    read_client,
    routing_client,
)

# ``register --ttl-ops``: the ttls of ``put-ttl``, short (expires during the run) and long (never does; the
# ``kv-expiry`` model treats a ttl of an hour or more as never expiring).
SHORT_TTL_MS = (50, 400)

LONG_TTL_MS = 86_400_000


class RegisterWorkload:
    """get / set / cas on ``keys_per_shard`` keys per shard, rotated every ``key_period`` s."""

    name = "register"
    model = "kv"

    def __init__(self, shardmap: Any, seed: int, keys_per_shard: int = 2, key_period: float = 5.0,
                 op_timeout: float = 4.0, read_any_node: bool = False,
                 mix: tuple[float, float, float] = (0.4, 0.3, 0.3), ttl_ops: float = 0.0,
                 read_routing: str = "own",
                 attempt_timeout: float | None = ATTEMPT_TIMEOUT_S, **_: Any) -> None:
        self.map = shardmap
        self.ttl_ops = ttl_ops
        self.model = "kv-expiry" if ttl_ops > 0 else "kv"
        self.seed = seed
        self.keys_per_shard = keys_per_shard
        self.key_period = key_period
        self.op_timeout = op_timeout
        self.read_any_node = read_any_node
        self.read_routing = read_routing
        self.attempt_timeout = attempt_timeout
        self.mix = mix
        self._keys: dict[int, list[str]] = {}
        self.last_value: dict[str, str | None] = {}  # last value any client saw or wrote, per key

    def keys_at(self, t: float) -> list[str]:
        """The keys in use at run time ``t``: ``keys_per_shard`` per shard, a fresh set every period."""
        gen = int(t // self.key_period) if self.key_period > 0 else 0
        if gen not in self._keys:
            per: dict[int, list[str]] = {s: [] for s in range(self.map.nshards)}
            i = 0
            while any(len(v) < self.keys_per_shard for v in per.values()):
                k = f"r{gen}.{i}"
                s = self.map.shard_for_key(k.encode())
                if len(per[s]) < self.keys_per_shard:
                    per[s].append(k)
                i += 1
            self._keys[gen] = [k for s in sorted(per) for k in per[s]]
        return self._keys[gen]

    def used_keys(self) -> list[str]:
        return [k for g in sorted(self._keys) for k in self._keys[g]]

    def setup(self, rec: Any) -> None:
        pass

    def worker(self, process: Any, rng: random.Random, final: bool = False) -> Worker:
        return _RegisterWorker(self, process, rng, pinned=self.read_any_node and not final)

    def final_ops(self) -> list[tuple[str, Any, Any]]:
        """One linearizable read of every key used (run after the heal)."""
        return [("get", k, None) for k in self.used_keys()]

    def check(self, ops: list, timeout_s: float | None) -> dict[str, Any]:
        res = check(ops, get_model(self.model), timeout_s=timeout_s)
        return {"linearizable": res}


class _RegisterWorker(Worker):
    def __init__(self, wl: RegisterWorkload, process: Any, rng: random.Random, pinned: bool) -> None:
        self.wl = wl
        self.process = process
        self.rng = rng
        self.n = 0
        self.node: NodeConn | None = None
        if pinned:  # reads (plain GET) and writes (session writes) all through one node, which forwards
            info = pinned_node(wl.map, process)
            self.node = NodeConn(info.client_addr, wl.op_timeout)
            self.node_name = info.name
            self.client = routing_client(wl, pin=info.client_addr)
        else:
            self.client = routing_client(wl)
        self.reader = read_client(self.client, wl.read_routing, wl)

    def next_op(self, t: float) -> tuple[str, Any, Any]:
        key = self.rng.choice(self.wl.keys_at(t))
        r = self.rng.random()
        get_p, put_p, _ = self.wl.mix
        if r < get_p:
            return "get", key, None
        self.n += 1
        new = f"{self.process}.{self.n}"
        if r < get_p + put_p:
            if self.rng.random() < self.wl.ttl_ops:
                short = self.rng.random() < 0.5
                return "put-ttl", key, [new, self.rng.randint(*SHORT_TTL_MS) if short else LONG_TTL_MS]
            return "put", key, new
        return "cas", key, [self.wl.last_value.get(key), new]

    def invoke(self, f: str, key: Any, value: Any) -> tuple[str, Any]:
        try:
            if f == "get":
                if self.node is not None:
                    out = _s(self.node.call("GET", key))
                else:
                    out = _s(self.reader.get(key))
                self.wl.last_value[key] = out
                return "ok", out
            if f == "put":
                self.client.put(key, value)
                self.wl.last_value[key] = value
                return "ok", None
            if f == "put-ttl":
                self.client.put(key, value[0], ttl=value[1] / 1000)
                self.wl.last_value[key] = value[0]
                return "ok", None
            if f == "cas":
                ok = self.client.cas(key, value[0], value[1])
                if ok:
                    self.wl.last_value[key] = value[1]
                return "ok", bool(ok)
        except Exception as e:  # noqa: BLE001 - every outcome goes into the history
            return classify(e, write=f != "get"), str(e)[:200]
        raise ValueError(f"unknown register op {f!r}")

    def close(self) -> None:
        self.client.close()
        if self.reader is not self.client:
            self.reader.close()
        if self.node is not None:
            self.node.close()
