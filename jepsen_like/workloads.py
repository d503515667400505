"""Workloads: what the harness's clients do, and how their history is checked.

A workload hands each client process a :class:`Worker` that proposes the next
operation (``f``, ``key``, ``value``, from the process's seeded ``Random``) and
performs it through the real client library, mapping the outcome onto the
history's completion types:

* ``ok``   — the call returned; its value is the result;
* ``fail`` — definitely not applied: ``UnavailableError`` (no leader / not
  reachable, nothing sent or the node refused), any other ``RaftKVError``
  (an error reply), or a read that did not complete (a read has no effect);
* ``info`` — maybe applied: ``IndeterminateError`` (code ``UNKNOWN``), or a
  write whose connection broke after the request may have left.

``register``: get / set / cas on a few keys per shard.  Written values are
unique (``"<process>.<n>"``), so a read names the write it saw.  Keys rotate
every ``key_period`` seconds (a fresh set of keys per shard, as Jepsen's
``independent`` does) so that each key's history, and so the checker's
search, stays small.  Checked per key for linearizability (``kv`` model).

``--read-any-node``: reads go over a plain RESP connection to a fixed node
(client *i* -> node *i mod N*) instead of through the routing ``Client``.  A
correct node forwards or proves leadership first, so this changes nothing for
the real store; a node in ``--unsafe-local-reads`` mode answers from its local
copy, which is stale as soon as it is cut off from its shard's majority.

``bank`` and ``txn`` need the transaction API (``Client.txn()``); in a build
without it they raise :class:`WorkloadUnavailable`.
"""

from __future__ import annotations

import random
import socket
from typing import Any

from jepsen_like.checker import check
from jepsen_like.models import get_model
from raftkv import protocol
from raftkv.client import Client, IndeterminateError, RaftKVError

__all__ = ["WORKLOADS", "WorkloadUnavailable", "Worker", "RegisterWorkload", "make_workload", "classify"]

WORKLOADS = ("register", "bank", "txn")


class WorkloadUnavailable(RuntimeError):
    """The workload cannot run against this build (e.g. no transaction API)."""


def classify(e: BaseException, write: bool) -> str:
    """History completion type for an exception raised by an operation."""
    if isinstance(e, IndeterminateError):
        return "info"
    if isinstance(e, RaftKVError):  # UnavailableError and error replies: not applied
        return "fail"
    return "info" if write else "fail"


def _s(v: Any) -> Any:
    return v.decode("utf-8", "replace") if isinstance(v, bytes | bytearray) else v


class NodeConn:
    """One plain RESP connection to a fixed node (used for ``--read-any-node`` reads)."""

    def __init__(self, addr: tuple[str, int], timeout: float) -> None:
        self.addr = addr
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.reader: Any = None

    def call(self, *args: bytes | str) -> Any:
        if self.sock is None:
            self.sock = socket.create_connection(self.addr, timeout=min(self.timeout, 2.0))
            self.reader = protocol.reply_reader()
        try:
            self.sock.settimeout(self.timeout)
            self.sock.sendall(protocol.encode_command(*args))
            while True:
                reply = self.reader.gets()
                if reply is not False:
                    break
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionError("connection closed by node")
                self.reader.feed(data)
        except (OSError, ConnectionError):
            self.close()
            raise
        if isinstance(reply, protocol.ReplyError):
            raise RaftKVError(reply.code, reply.message)
        return reply

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        self.sock = None


class Worker:
    """One client process: ``next_op`` proposes, ``invoke`` performs; ``close`` at the end."""

    def next_op(self, t: float) -> tuple[str, Any, Any]:
        raise NotImplementedError

    def invoke(self, f: str, key: Any, value: Any) -> tuple[str, Any]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class RegisterWorkload:
    """get / set / cas on ``keys_per_shard`` keys per shard, rotated every ``key_period`` s."""

    name = "register"
    model = "kv"

    def __init__(self, shardmap: Any, seed: int, keys_per_shard: int = 2, key_period: float = 5.0,
                 op_timeout: float = 4.0, read_any_node: bool = False,
                 mix: tuple[float, float, float] = (0.4, 0.3, 0.3)) -> None:
        self.map = shardmap
        self.seed = seed
        self.keys_per_shard = keys_per_shard
        self.key_period = key_period
        self.op_timeout = op_timeout
        self.read_any_node = read_any_node
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

    def worker(self, process: int, rng: random.Random) -> Worker:
        return _RegisterWorker(self, process, rng)

    def final_read(self, client: Client, key: str) -> Any:
        return _s(client.get(key))

    def check(self, ops: list, timeout_s: float | None) -> dict[str, Any]:
        res = check(ops, get_model(self.model), timeout_s=timeout_s)
        return {"linearizable": res}


class _RegisterWorker(Worker):
    def __init__(self, wl: RegisterWorkload, process: int, rng: random.Random) -> None:
        self.wl = wl
        self.process = process
        self.rng = rng
        self.n = 0
        self.client = Client(cluster=wl.map, timeout=wl.op_timeout)
        self.node: NodeConn | None = None
        if wl.read_any_node:
            names = sorted(wl.map.nodes)
            info = wl.map.nodes[names[process % len(names)]]
            self.node = NodeConn(info.client_addr, wl.op_timeout)
            self.node_name = info.name

    def next_op(self, t: float) -> tuple[str, Any, Any]:
        key = self.rng.choice(self.wl.keys_at(t))
        r = self.rng.random()
        get_p, put_p, _ = self.wl.mix
        if r < get_p:
            return "get", key, None
        self.n += 1
        new = f"{self.process}.{self.n}"
        if r < get_p + put_p:
            return "put", key, new
        return "cas", key, [self.wl.last_value.get(key), new]

    def invoke(self, f: str, key: Any, value: Any) -> tuple[str, Any]:
        try:
            if f == "get":
                if self.node is not None:
                    out = _s(self.node.call("GET", key))
                else:
                    out = _s(self.client.get(key))
                self.wl.last_value[key] = out
                return "ok", out
            if f == "put":
                self.client.put(key, value)
                self.wl.last_value[key] = value
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
        if self.node is not None:
            self.node.close()


def _txn_api_available() -> bool:
    return callable(getattr(Client, "txn", None))


def make_workload(name: str, shardmap: Any, seed: int, **kw: Any) -> RegisterWorkload:
    """The workload ``name``; raises :class:`WorkloadUnavailable` when this build cannot run it."""
    if name == "register":
        return RegisterWorkload(shardmap, seed, **kw)
    if name in ("bank", "txn"):
        if not _txn_api_available():
            raise WorkloadUnavailable(
                f"workload {name!r} is not available in this build: it needs the transaction API "
                "(raftkv.Client.txn()), which this raftkv.Client does not have yet")
        raise WorkloadUnavailable(f"workload {name!r} is not implemented in this harness version yet")
    raise ValueError(f"unknown workload {name!r} (expected one of {', '.join(WORKLOADS)})")

