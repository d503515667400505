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
With ``ttl_ops`` (``--ttl-ops F``) a fraction F of the puts are ``put-ttl``
(``SET k v PX ms``): half of them with a short ttl (``SHORT_TTL_MS``, so the
value expires while the key is still in use), half with one far longer than
any run (``LONG_TTL_MS``); checked with the ``kv-expiry`` model, which lets a
short-ttl value vanish at any moment after its put without knowing the
store's log time.

``--read-any-node``: reads go over a plain RESP connection to a fixed node
(client *i* -> node *i mod N*) instead of through the routing ``Client``.  A
correct node forwards or proves leadership first, so this changes nothing for
the real store; a node in ``--unsafe-local-reads`` mode answers from its local
copy, which is stale as soon as it is cut off from its shard's majority.

``counter``: the classic lost-update check through Redis's optimistic
transactions. Each increment is ``WATCH k; GET k`` (recorded as a ``get``)
then ``MULTI; SET k v+1; EXEC`` (recorded as ``cas [v, v+1]``: EXEC commits
only if ``k`` did not change since the WATCH, so a committed EXEC is exactly a
compare-and-set from the value read; an aborted EXEC applied nothing and is a
``fail`` -- it says the key changed after the WATCH, which may have come before
the GET, so not that the value differed from ``v``). A client whose node does not
answer moves on to the next node. Checked per key for linearizability
(``kv`` model) and by ``lost-update``: each counter's final value lies between
the acknowledged increments and those plus the indeterminate ones.

``lock``: clients acquire and release a few locks per shard (``Client.lock``:
the lock key held through a lease kept alive in the background), rotated every
``key_period`` seconds.  History ops are ``acquire`` / ``release`` per lock
name; checked per lock with the mutex model (at most one holder at a time).

``append``: Elle's list-append over the transaction API.  Each transaction is
1-4 micro-ops ``["append", k, x]`` (``x`` unique in the run: ``"<process>.<n>"``)
or ``["r", k, None]`` on the current key group (keys on every shard, rotated
every ``key_period`` seconds like ``txn``, so each list stays short).  An
append is ``APPEND k "x,"`` inside ``RAFTKV.TXN`` (computed under the
transaction's lock on ``k``); a read is a ``GET`` in the same transaction, its
value split on ``,`` into the list (as Jepsen's Redis list-append test does with
strings; a value not ending in ``,`` keeps its tail as an element, which Elle
reports as a garbage read).  Checked by ``elle.check(ops, "list-append")``:
G0, G1a/b/c, G-single, G2-item, lost update, internal, duplicate elements, ...
named with their cycles.  The final reads are one read-only transaction per
key group.

``set``: Jepsen's set.  Each client adds unique elements (``"<process>.<n>"``) with ``APPEND k "e,"`` on
one of ``keys_per_shard`` fixed keys per shard (the store has no set type; ``Client.append``, a
de-duplicated write) and reads the whole set: a ``GET`` of every key, one after another, through the
routing ``Client`` or, with ``--read-any-node``, over plain RESP to the client's pinned node (the read's
``key`` in the history names that node).  The default operation timeout is short (``SET_OP_TIMEOUT_S``),
so adds caught in a failover come back indeterminate (``info``) and the final reads decide them.  The final
reads, after the heal, read the whole set through every node and last through the routing client.
Checked per element by :func:`jepsen_like.sets.check_set` (lost, stale, unexpected, duplicated); a set
spread over shards is read key by key, not as one snapshot, which a per-element check does not need.

``bank``, ``txn`` and ``append`` need the transaction API (``Client.txn()``; for
``append``, its ``then_append``); in a build without it they raise
:class:`WorkloadUnavailable`.
"""

from __future__ import annotations

import random
import time
from typing import Any

from jepsen_like import elle, sets
from jepsen_like.checker import check
from jepsen_like.models import get_model
from raftkv import protocol
from raftkv.client import Client, IndeterminateError, RaftKVError
from raftkv.connection import Connection
from raftkv.txnclient import Txn

__all__ = ["WORKLOADS", "WorkloadUnavailable", "Worker", "RegisterWorkload", "SetWorkload", "make_workload",
           "default_op_timeout", "classify"]

WORKLOADS = ("register", "counter", "bank", "txn", "lock", "append", "set")
# Client timeout per operation (``--op-timeout``) when not given: ``set`` keeps it short so that adds in flight
# during a failover end indeterminate, as Jepsen's clients' do; the others wait through most failovers.
OP_TIMEOUT_S = 4.0
SET_OP_TIMEOUT_S = 1.0
# ``register --ttl-ops``: the ttls of ``put-ttl``, short (expires during the run) and long (never does; the
# ``kv-expiry`` model treats a ttl of an hour or more as never expiring).
SHORT_TTL_MS = (50, 400)
LONG_TTL_MS = 86_400_000


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


# Every prefix a workload's keys start with: with ``--auth`` the clients' role may write only these.
KEY_PREFIXES = ("r", "c", "acct", "t", "lock", "ap", "set")
# Credentials of the harness's clients (``--auth``: a user whose role covers only KEY_PREFIXES).
CLIENT_AUTH: dict[str, str] = {}


class NodeConn:
    """Plain RESP to one fixed node (``--read-any-node`` reads): no routing, no retries.

    Connects on first use and again after a transport failure; an error reply
    raises ``RaftKVError`` so that ``classify`` maps it like the client's errors.
    """

    def __init__(self, addr: tuple[str, int], timeout: float) -> None:
        self.addr = addr
        self.timeout = timeout
        self.conn: Connection | None = None

    def call(self, *args: bytes | str) -> Any:
        if self.conn is None or self.conn.closed:
            auth = [CLIENT_AUTH["username"], CLIENT_AUTH["password"]] if CLIENT_AUTH else None
            self.conn = Connection(self.addr[0], self.addr[1], timeout=min(self.timeout, 2.0), auth=auth)
        reply = self.conn.call(*args, timeout=self.timeout)
        if isinstance(reply, protocol.ReplyError):
            if reply.code == "UNKNOWN":  # the node could not tell whether the write applied
                raise IndeterminateError(reply.code, reply.message)
            raise RaftKVError(reply.code, reply.message)
        return reply

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn = None


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
                 mix: tuple[float, float, float] = (0.4, 0.3, 0.3), ttl_ops: float = 0.0, **_: Any) -> None:
        self.map = shardmap
        self.ttl_ops = ttl_ops
        self.model = "kv-expiry" if ttl_ops > 0 else "kv"
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
        self.client = Client(cluster=wl.map, timeout=wl.op_timeout, **CLIENT_AUTH)
        self.node: NodeConn | None = None
        if pinned:
            names = sorted(wl.map.nodes)
            info = wl.map.nodes[names[int(process) % len(names)]]
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
                    out = _s(self.client.get(key))
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
        if self.node is not None:
            self.node.close()


def _txn_api_available() -> bool:
    return callable(getattr(Client, "txn", None))


def _keys_per_shard(shardmap: Any, prefix: str, per_shard: int) -> list[str]:
    """``per_shard`` key names on every shard (``prefix`` + counter), grouped by shard."""
    per: dict[int, list[str]] = {s: [] for s in range(shardmap.nshards)}
    i = 0
    while any(len(v) < per_shard for v in per.values()):
        k = f"{prefix}{i}"
        s = shardmap.shard_for_key(k.encode())
        if len(per[s]) < per_shard:
            per[s].append(k)
        i += 1
    return [k for s in sorted(per) for k in per[s]]


def _commit(client: Client, micro: list[list[Any]], compares: list[list[Any]] | None = None,
            retries: int = 5) -> tuple[bool, list[list[Any]]]:
    """Run micro-ops ``[["r", k, None] | ["w", k, v], ...]`` as one ``Client.txn()`` (then-branch
    guarded by ``compares`` ``[[k, v], ...]``, empty else-branch); return (then ran?, ops with reads)."""
    t = client.txn()
    for k, v in compares or ():
        t.if_value(k, v)
    for kind, k, v in micro:
        if kind == "r":
            t.then_get(k)
        else:
            t.then_put(k, v)
    r = t.commit(retries=retries)
    if not r.succeeded:
        return False, []
    return True, [[kind, k, _s(res) if kind == "r" else v] for (kind, k, v), res in zip(micro, r.results, strict=True)]


class _TxnWorkerBase(Worker):
    def __init__(self, wl: Any, process: Any, rng: random.Random) -> None:
        self.wl = wl
        self.process = process
        self.rng = rng
        self.client = Client(cluster=wl.map, timeout=wl.op_timeout, **CLIENT_AUTH)

    def close(self) -> None:
        self.client.close()


class BankWorkload:
    """Transfers between accounts on different shards, by conditional transactions.

    Set-up (recorded in the history as an ``ok`` txn of process ``setup``): every
    account gets ``balance``.  Each client op is one of

    * a *full read*: one transaction reading every account (an atomic snapshot);
    * a *transfer*: a transaction reading two accounts on different shards,
      then a conditional transaction ``if a == va and b == vb then a := va - x,
      b := vb + x`` (two ops in the history; an amount above ``va`` is not tried).

    Checks: ``total-constant`` (every full read sums to the initial total),
    ``no-negative`` (no read returns a negative balance), ``linearizable`` (the
    whole history under the transaction model: strict serializability).
    """

    name = "bank"

    def __init__(self, shardmap: Any, seed: int, accounts_per_shard: int = 2, balance: int = 100,
                 op_timeout: float = 4.0, **_: Any) -> None:
        self.map = shardmap
        self.op_timeout = op_timeout
        self.balance = balance
        self.accounts = _keys_per_shard(shardmap, "acct", accounts_per_shard)
        self.total = balance * len(self.accounts)

    def setup(self, rec: Any) -> None:
        micro = [["w", a, str(self.balance)] for a in self.accounts]
        rec.add("setup", "invoke", "txn", None, micro)
        with Client(cluster=self.map, timeout=30.0, **CLIENT_AUTH) as c:
            c.mset({a: str(self.balance) for a in self.accounts}, retries=20)
        rec.add("setup", "ok", "txn", None, micro)

    def worker(self, process: Any, rng: random.Random, final: bool = False) -> Worker:
        return _BankWorker(self, process, rng)

    def final_ops(self) -> list[tuple[str, Any, Any]]:
        return [("txn", None, [["r", a, None] for a in self.accounts])]

    def check(self, ops: list, timeout_s: float | None) -> dict[str, Any]:
        reads = [op for op in ops if op.status == "ok" and op.f == "txn" and isinstance(op.output, list)
                 and all(m[0] == "r" for m in op.output)]
        full = [op for op in reads if len(op.output) == len(self.accounts)]
        bad_total = [op for op in full if sum(int(m[2]) for m in op.output if m[2] is not None) != self.total
                     or any(m[2] is None for m in op.output)]
        negative = [op for op in reads if any(m[2] is not None and int(m[2]) < 0 for m in op.output)]
        return {
            "total-constant": _Invariant(f"{len(full)} full reads, total {self.total}", bad_total),
            "no-negative": _Invariant(f"{len(reads)} reads", negative),
            "linearizable": check(ops, get_model("txn"), timeout_s=timeout_s),
        }


class _BankWorker(_TxnWorkerBase):
    def __init__(self, wl: BankWorkload, process: Any, rng: random.Random) -> None:
        super().__init__(wl, process, rng)
        self.pending: tuple[str, str, int] | None = None
        self.seen: dict[str, str] = {}

    def next_op(self, t: float) -> tuple[str, Any, Any]:
        wl = self.wl
        if self.pending is not None:
            a, b, amount = self.pending
            self.pending = None
            va, vb = self.seen.get(a), self.seen.get(b)
            if va is not None and vb is not None and int(va) >= amount:
                return "txn", None, {"if": [[a, va], [b, vb]],
                                     "then": [["w", a, str(int(va) - amount)], ["w", b, str(int(vb) + amount)]],
                                     "else": []}
        if self.rng.random() < 0.3:
            return "txn", None, [["r", a, None] for a in wl.accounts]
        while True:
            a, b = self.rng.sample(wl.accounts, 2)
            if wl.map.shard_for_key(a.encode()) != wl.map.shard_for_key(b.encode()):
                break
        self.pending = (a, b, self.rng.randint(1, 5))
        return "txn", None, [["r", a, None], ["r", b, None]]

    def invoke(self, f: str, key: Any, value: Any) -> tuple[str, Any]:
        try:
            if isinstance(value, dict):
                ok, done = _commit(self.client, value["then"], value["if"])
                return "ok", {"branch": "then" if ok else "else", "ops": done}
            ok, done = _commit(self.client, value)
            for _, k, v in done:
                self.seen[k] = v
            return "ok", done
        except Exception as e:  # noqa: BLE001
            self.pending = None
            return classify(e, write=isinstance(value, dict)), str(e)[:200]


class _RotatingGroups:
    """Workloads on groups of ``keys_per_shard`` keys on every shard (named ``prefix`` + generation),
    a fresh group every ``key_period`` seconds, so that each key's history stays small."""

    prefix = ""

    def __init__(self, shardmap: Any, seed: int, keys_per_shard: int = 1, key_period: float = 5.0,
                 op_timeout: float = 4.0, **_: Any) -> None:
        self.map = shardmap
        self.keys_per_shard = keys_per_shard
        self.key_period = key_period
        self.op_timeout = op_timeout
        self._groups: dict[int, list[str]] = {}

    def setup(self, rec: Any) -> None:
        """Nothing to set up: every group starts empty."""

    def group_at(self, t: float) -> list[str]:
        gen = int(t // self.key_period) if self.key_period > 0 else 0
        if gen not in self._groups:
            self._groups[gen] = _keys_per_shard(self.map, f"{self.prefix}{gen}.", self.keys_per_shard)
        return self._groups[gen]

    def used_keys(self) -> list[str]:
        return [k for g in sorted(self._groups) for k in self._groups[g]]


class TxnWorkload(_RotatingGroups):
    """Random multi-key transactions (1-4 reads/writes, each key once) within a key group.

    A group is ``keys_per_shard`` keys on every shard; groups rotate every
    ``key_period`` seconds so that the transaction model's partitions (connected
    components of keys) stay small.  Written values are unique.  Checked with
    the transaction model (strict serializability), by the Elle checker
    (``elle``: the same history as rw-register transactions, anomalies named:
    G0, G1a/b/c, G-single, G2-item, lost update, ... with the models they rule
    out), plus ``recovered`` and ``final-reads`` (a plain read of every key used).
    """

    name = "txn"
    prefix = "t"

    def worker(self, process: Any, rng: random.Random, final: bool = False) -> Worker:
        return _TxnWorker(self, process, rng)

    def final_ops(self) -> list[tuple[str, Any, Any]]:
        return [("get", k, None) for k in self.used_keys()]

    def check(self, ops: list, timeout_s: float | None) -> dict[str, Any]:
        return {"linearizable": check(ops, get_model("txn"), timeout_s=timeout_s), "elle": _elle(ops)}


def _elle(ops: list, workload: str = "rw-register") -> Any:
    """The Elle check; a history it cannot read is an unknown verdict, not a crash."""
    try:
        return elle.check(ops, workload)
    except elle.ElleError as e:
        return elle.ElleResult(verdict=elle.UNKNOWN_VERDICT, workload=workload,
                               models=("strict-serializable",), reason=f"cannot check: {e}")


class _TxnWorker(_TxnWorkerBase):
    n = 0
    write = "w"  # the micro-op kind of a write

    def keys(self, group: list[str]) -> list[str]:
        """The keys of the next transaction: 1-4 of the group, each at most once."""
        return self.rng.sample(group, self.rng.randint(1, min(4, len(group))))

    def next_op(self, t: float) -> tuple[str, Any, Any]:
        micro = []
        for k in self.keys(self.wl.group_at(t)):
            if self.rng.random() < 0.5:
                micro.append(["r", k, None])
            else:
                self.n += 1
                micro.append([self.write, k, f"{self.process}.{self.n}"])
        return "txn", None, micro

    def invoke(self, f: str, key: Any, value: Any) -> tuple[str, Any]:
        try:
            if f == "get":
                return "ok", _s(self.client.get(key))
            _, done = _commit(self.client, value)
            return "ok", done
        except Exception as e:  # noqa: BLE001
            return classify(e, write=f != "get" and any(m[0] == "w" for m in value)), str(e)[:200]


class AppendWorkload(_RotatingGroups):
    """Elle list-append transactions within a rotating key group (module doc)."""

    name = "append"
    prefix = "ap"

    def worker(self, process: Any, rng: random.Random, final: bool = False) -> Worker:
        return _AppendWorker(self, process, rng)

    def final_ops(self) -> list[tuple[str, Any, Any]]:
        return [("txn", None, [["r", k, None] for k in self._groups[g]]) for g in sorted(self._groups)]

    def check(self, ops: list, timeout_s: float | None) -> dict[str, Any]:
        return {"elle": _elle(ops, "list-append")}


def parse_list(value: Any) -> list[str]:
    """A list-append key's value (``"x1,x2,"``) as its list; missing is empty.  A tail without its
    ``,`` stays an element (Elle flags an element nobody appended as a garbage read)."""
    if value is None:
        return []
    parts = _s(value).split(",")
    if parts[-1] == "":
        parts.pop()
    return parts


class _AppendWorker(_TxnWorker):
    write = "append"

    def keys(self, group: list[str]) -> list[str]:
        """1-4 keys of the group, a key possibly more than once (Elle checks reads after own appends)."""
        return [self.rng.choice(group) for _ in range(self.rng.randint(1, 4))]

    def invoke(self, f: str, key: Any, value: Any) -> tuple[str, Any]:
        t = self.client.txn()
        for kind, k, x in value:
            if kind == "r":
                t.then_get(k)
            else:
                t.then_append(k, f"{x},")
        try:
            r = t.commit(retries=5)
        except Exception as e:  # noqa: BLE001 - every outcome goes into the history
            return classify(e, write=any(m[0] == "append" for m in value)), str(e)[:200]
        return "ok", [[kind, k, parse_list(res) if kind == "r" else x]
                      for (kind, k, x), res in zip(value, r.results, strict=True)]


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
    return _Invariant(f"{len(final)} counters, {sum(acked.values())} acknowledged increments", bad)


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


class LockWorkload(_RotatingGroups):
    """acquire / release of ``keys_per_shard`` locks per shard, rotated every ``key_period`` s.

    Each client alternates: acquire a random current lock (waiting at most
    ``op_timeout``), then release it at its next op.  Outcomes:

    * acquire ``ok``: held (its value is the fencing token); ``fail``: not held
      (another holder kept it for the whole wait, or no leader); ``info``: unknown
      (``Client.lock`` revokes its lease on the way out, so it is not held after);
    * release ``ok``: the lease was revoked (the lock key is gone); ``info`` for
      anything else: a revocation that failed leaves the lock to expire with its
      lease, and a lease found *lost* (it lapsed while the client believed it held
      the lock) is recorded as ``info`` too, so an acquire by another client
      before the release's invocation shows up as two holders.

    The lease ttl is ``lock_ttl`` s, long against the nemeses' faults (the log time
    that expires a lease stands still while a shard has no leader), and against the
    end of the run: a client still holding at the end abandons its lock (its lease
    expires after the run) so that no unrecorded release races another client's
    last acquire.  Checked with the mutex model, partitioned per lock.

    ``unsafe_lock_lapse`` (``--unsafe-lock-lapse``) is the negative control on a real
    cluster: holders take a 1 s lease, stop its keep-alive at once and wait
    ``LAPSE_HOLD_S`` before releasing, as a holder paused past its lease would; the
    lock goes to the next client meanwhile, which the mutex check must report.
    """

    LAPSE_HOLD_S = 2.5

    name = "lock"
    model = "mutex"
    prefix = "lock"

    def __init__(self, shardmap: Any, seed: int, keys_per_shard: int = 1, key_period: float = 5.0,
                 op_timeout: float = 4.0, lock_ttl: float = 15.0, unsafe_lock_lapse: bool = False,
                 **_: Any) -> None:
        super().__init__(shardmap, seed, keys_per_shard, key_period, op_timeout)
        self.lapse = unsafe_lock_lapse
        self.lock_ttl = 1.0 if unsafe_lock_lapse else lock_ttl

    def worker(self, process: Any, rng: random.Random, final: bool = False) -> Worker:
        return _LockWorker(self, process, rng)

    def final_ops(self) -> list[tuple[str, Any, Any]]:
        return []

    def check(self, ops: list, timeout_s: float | None) -> dict[str, Any]:
        return {"mutex": check(ops, get_model(self.model), timeout_s=timeout_s)}


class _LockWorker(_TxnWorkerBase):
    def __init__(self, wl: LockWorkload, process: Any, rng: random.Random) -> None:
        super().__init__(wl, process, rng)
        self.held: Any = None  # the raftkv.client.Lock this client holds

    def next_op(self, t: float) -> tuple[str, Any, Any]:
        if self.held is not None:
            if self.wl.lapse:  # hold past the lease, between the acquire's return and the release's invocation
                time.sleep(self.wl.LAPSE_HOLD_S)
            return "release", self.held.name.decode(), None
        return "acquire", self.rng.choice(self.wl.group_at(t)), None

    def invoke(self, f: str, key: Any, value: Any) -> tuple[str, Any]:
        if f == "acquire":
            lock = self.client.lock(key, ttl=self.wl.lock_ttl, wait=self.wl.op_timeout)
            try:
                token = lock.acquire()
            except Exception as e:  # noqa: BLE001
                return classify(e, write=True), str(e)[:200]
            if self.wl.lapse:
                lock.abandon()
            self.held = lock
            return "ok", token
        lock, self.held = self.held, None
        try:
            lock.release()
        except Exception as e:  # noqa: BLE001 - not revoked: the lock lapses with its lease, some time later
            return "info", str(e)[:200]
        return ("info", "lease lost while held") if lock.lost else ("ok", None)

    def close(self) -> None:
        if self.held is not None:
            self.held.abandon()  # its lease expires after the run (see LockWorkload)
        super().close()


class _Invariant:
    """A non-linearizability check result with the same surface the report uses (verdict, ok, summary)."""

    def __init__(self, what: str, bad: list) -> None:
        self.bad = bad
        self.ok = not bad
        self.verdict = "valid" if self.ok else "invalid"
        self.what = what

    def summary(self) -> str:
        return f"{self.what}: " + ("all hold" if self.ok else f"{len(self.bad)} violate it")


def default_op_timeout(workload: str) -> float:
    """``--op-timeout`` when the user gave none."""
    return SET_OP_TIMEOUT_S if workload == "set" else OP_TIMEOUT_S


class SetWorkload:
    """Jepsen's set: unique adds (APPEND of ``"e,"``) and whole-set reads over fixed keys (module doc)."""

    name = "set"
    prefix = "set"
    READ_SHARE = 0.25

    def __init__(self, shardmap: Any, seed: int, keys_per_shard: int = 2, op_timeout: float = SET_OP_TIMEOUT_S,
                 read_any_node: bool = False, **_: Any) -> None:
        self.map = shardmap
        self.op_timeout = op_timeout
        self.read_any_node = read_any_node
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
        self.client = Client(cluster=wl.map, timeout=wl.op_timeout, **CLIENT_AUTH)
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
                out += parse_list(self.client.get(k))
                continue
            if via not in self.nodes:
                self.nodes[via] = NodeConn(self.wl.map.nodes[via].client_addr, self.wl.op_timeout)
            out += parse_list(self.nodes[via].call("GET", k))
        return out

    def close(self) -> None:
        self.client.close()
        for conn in self.nodes.values():
            conn.close()


def make_workload(name: str, shardmap: Any, seed: int, **kw: Any) -> Any:
    """The workload ``name``; raises :class:`WorkloadUnavailable` when this build cannot run it."""
    if name == "register":
        return RegisterWorkload(shardmap, seed, **kw)
    if name == "counter":
        return CounterWorkload(shardmap, seed, **kw)
    if name in ("bank", "txn", "append"):
        if not _txn_api_available() or (name == "append" and not callable(getattr(Txn, "then_append", None))):
            raise WorkloadUnavailable(
                f"workload {name!r} is not available in this build: it needs the transaction API "
                "(raftkv.Client.txn(), with then_append for 'append'), which this raftkv.Client does not have yet")
        return {"bank": BankWorkload, "txn": TxnWorkload, "append": AppendWorkload}[name](shardmap, seed, **kw)
    if name == "lock":
        return LockWorkload(shardmap, seed, **kw)
    if name == "set":
        return SetWorkload(shardmap, seed, **kw)
    raise ValueError(f"unknown workload {name!r} (expected one of {', '.join(WORKLOADS)})")
