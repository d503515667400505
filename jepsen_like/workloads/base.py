"""What every workload shares: the worker protocol, outcome classification, key groups, plain RESP reads."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from raftkv import protocol
from raftkv.client import Client, IndeterminateError, RaftKVError
from raftkv.connection import Connection

# Client timeout per operation (``--op-timeout``) when not given: ``set`` keeps it short so that adds in flight
# during a failover end indeterminate, as Jepsen's clients' do; the others wait through most failovers.
OP_TIMEOUT_S = 4.0

SET_OP_TIMEOUT_S = 1.0


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


# ``--attempt-timeout`` when not given: long enough for a commit on a loaded machine, short against a fault window.
ATTEMPT_TIMEOUT_S = 1.0

# ``--read-routing``: how a worker's reads reach the cluster when they go through the routing ``Client``.
READ_ROUTINGS = ("own", "shared")


class HarnessClient(Client):
    """The routing ``Client`` with every attempt (one node's reply) bounded by ``attempt_timeout`` seconds.

    The operation's ``timeout`` still bounds the whole call.  Without the bound, one attempt may use all of
    it: a request sent to a leader that was cut off from its majority gets no reply, so the client waits out
    the operation's timeout there (4 s, as long as a fault window) instead of re-routing to the new leader.
    With it, the attempt fails after ``attempt_timeout``, the client forgets that leader and retries
    elsewhere; a retried write keeps its session sequence number, so it is applied at most once.
    ``None`` or 0: no bound.

    ``pin``: send every attempt to this one node, whichever node the client means to reach (``--read-any-node``
    writes): the node forwards what it does not lead, as it would for any Redis client, and the client's
    session (``RAFTKV.REQ``) makes a retried write apply at most once through that forwarding too. A client
    bound to one node, as Jepsen binds its clients: when that node is down or cut off, its operations fail.
    """

    def __init__(self, *args: Any, attempt_timeout: float | None = None, pin: tuple[str, int] | None = None,
                 **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.attempt_timeout = attempt_timeout
        self.pin = pin

    def _call_node(self, addr: tuple[str, int], args: list[bytes], timeout: float) -> Any:
        return super()._call_node(self.pin or addr, args, attempt_budget(timeout, self.attempt_timeout))


def attempt_budget(remaining: float, attempt_timeout: float | None) -> float:
    """Seconds one attempt may wait: what is left of the operation, at most ``attempt_timeout`` (if set)."""
    return min(remaining, attempt_timeout) if attempt_timeout else remaining


def routing_client(wl: Any, pin: tuple[str, int] | None = None) -> HarnessClient:
    """A worker's routing client: the workload's map, operation timeout, attempt bound and credentials;
    ``pin``: every request to that node instead (see ``HarnessClient``)."""
    return HarnessClient(cluster=wl.map, timeout=wl.op_timeout, attempt_timeout=wl.attempt_timeout, pin=pin,
                         **CLIENT_AUTH)


def pinned_node(shardmap: Any, process: Any) -> Any:
    """The node client ``process`` is bound to under ``--read-any-node``: client i -> node i mod N."""
    names = sorted(shardmap.nodes)
    return shardmap.nodes[names[int(process) % len(names)]]


def read_client(write_client: Client, routing: str, wl: Any) -> Client:
    """The routing ``Client`` a worker reads through (``--read-routing``).

    ``shared``: the worker's write client, so a write that fails on a deposed leader re-routes the reads
    that follow it too.  ``own``: a second client whose leader cache only the reads' own failures
    refresh, as in a process that only reads: it keeps reading where it last found a leader until a
    read there fails, so a node that answers reads it should refuse (a deposed leader serving its local
    copy) is read from for as long as it keeps answering.
    """
    if routing == "shared":
        return write_client
    if routing == "own":
        return routing_client(wl)
    raise ValueError(f"unknown read routing {routing!r} (expected one of {', '.join(READ_ROUTINGS)})")


class Worker:
    """One client process: ``next_op`` proposes, ``invoke`` performs; ``close`` at the end."""

    def next_op(self, t: float) -> tuple[str, Any, Any]:
        raise NotImplementedError

    def invoke(self, f: str, key: Any, value: Any) -> tuple[str, Any]:
        raise NotImplementedError

    def close(self) -> None:
        pass


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


class _Invariant:
    """A non-linearizability check result with the same surface the report uses (verdict, ok, summary)."""

    def __init__(self, what: str, bad: list, explain: Callable[[Any], str] | None = None) -> None:
        self.bad = bad
        self.ok = not bad
        self.verdict = "valid" if self.ok else "invalid"
        self.what = what
        self._explain = explain

    def summary(self) -> str:
        return f"{self.what}: " + ("all hold" if self.ok else f"{len(self.bad)} violate it")

    def describe_bad(self, n: int) -> list[str]:
        """The first ``n`` violations as text: ``explain`` of each when given (violations that are not
        ops, e.g. a counter's totals), else each op's own description."""
        return [self._explain(b) if self._explain else b.describe() for b in self.bad[:n]]


def default_op_timeout(workload: str) -> float:
    """``--op-timeout`` when the user gave none."""
    return SET_OP_TIMEOUT_S if workload == "set" else OP_TIMEOUT_S


def parse_list(value: Any) -> list[str]:
    """A list-append key's value (``"x1,x2,"``) as its list; missing is empty.  A tail without its
    ``,`` stays an element (Elle flags an element nobody appended as a garbage read)."""
    if value is None:
        return []
    parts = _s(value).split(",")
    if parts[-1] == "":
        parts.pop()
    return parts
