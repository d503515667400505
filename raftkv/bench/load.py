"""The load generator: closed-loop virtual clients spread over worker processes, one event loop each.

Theory of operation
-------------------
N virtual clients, each with one request in flight, are spread over several worker processes (``procs``;
default: the number of CPUs, capped by N).  Each process runs one ``selectors`` event loop over raw
non-blocking sockets, so one Python process never has to run 32 threads.  This is deliberately not
``raftkv.connection.Connection``: that one blocks on each reply, while a worker keeps dozens of requests in
flight and feeds whatever bytes arrive into each connection's parser (hiredis for RESP, ``HttpReader`` for
etcd's JSON gateway).  Blocking calls made here for control (leader lookup, loading Redis's CAS script) do
use ``Connection``.  etcd through its native gRPC API (``etcd-grpc``) cannot share that loop: its worker runs
one asyncio loop instead, one coroutine per virtual client and one ``grpc.aio`` channel (one HTTP/2
connection) per etcd member, shared by the process's clients as etcd's own clients share theirs.

etcd is spoken to the same way through either API: writes go to the leader (from the spec, looked up again
after a failed write), reads to the client's member (clients spread over the members); ranges are
linearizable (serializable for ``stale_get``).

raftkv is spoken to exactly as ``raftkv.Client`` does: writes are session-wrapped (``RAFTKV.REQ sid seq
...``, de-duplicated), every command goes to the shard's leader as learned from ``RAFTKV.SHARDS`` (a stale
guess costs a forward, an error reply triggers a refresh).  ``via="client"`` drives raftkv through
``raftkv.Client`` in threads instead.  Latencies go into ``Hist`` per process, merged by the parent.  Only
requests sent and answered inside the measured window (after ``warmup``) count.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import multiprocessing as mp
import os
import random
import selectors
import signal
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import hiredis

from raftkv import protocol
from raftkv.bench import etcd_grpc
from raftkv.bench.etcd_http import HttpReader, b64, find_leader, http_request, leader_index
from raftkv.bench.hist import Hist
from raftkv.bench.systems import System, proc_cpu_s
from raftkv.bench.workloads import WRITES, KeyGen, counter_name, key_name, make_value
from raftkv.client import Client, IndeterminateError, RaftKVError
from raftkv.connection import Connection
from shards.shardmap import ShardMap

# Error replies after which raftkv's leader for the shard is looked up again (and preload resends).
RETRY_CODES = {"MOVED", "TRYAGAIN", "NOQUORUM", "UNKNOWN", "LOCKED", "BUSY"}


@dataclass
class LoadParams:
    workload: str
    clients: int
    duration: float
    warmup: float = 1.0
    keyspace: int = 10_000
    value_size: int = 100
    dist: str = "uniform"
    procs: int = 0  # 0: min(clients, cpu count)
    op_timeout: float = 10.0
    via: str = "raw"  # raw sockets, or "client" (raftkv.Client in threads; raftkv only)
    seed: int = 0
    # Every value sent to raftkv starts with the wall-clock time (time.time()) it was sent: the watch
    # benchmark's puts (``stamped``); the other systems ignore it.
    stamp: bool = False
    # At the end of the window stop sending and wait (up to op_timeout) for the replies still due, so that
    # every write sent is counted as acknowledged or as maybe applied (the watch benchmark's exact count).
    drain: bool = False


@dataclass
class Result:
    system: str
    workload: str
    clients: int
    ops: int
    seconds: float
    ops_s: float
    p50_ms: float | None
    p99_ms: float | None
    p999_ms: float | None
    errors: int
    indeterminate: int
    error_codes: dict = field(default_factory=dict)
    generator: dict = field(default_factory=dict)
    txn_retries: int = 0  # transactions resent after TXNCONFLICT/TRYAGAIN (inside one measured op)
    server_cpu: float | None = None  # CPU-seconds of the server processes per wall second in the window
    hist: dict | None = None
    acked: int = 0  # every request that succeeded, in the window or not (warm-up and drain included)
    maybe_applied: int = 0  # every write that may have been applied without an acknowledgement, likewise

    def row(self) -> dict:
        d = asdict(self)
        d.pop("hist")
        return d


class _LoadConn:
    """One virtual client's socket to one node, read by the worker's event loop (never blocks on a reply)."""

    __slots__ = ("sock", "reader", "vc", "key")

    def __init__(self, addr: tuple[str, int], vc: _VClient, http: bool) -> None:
        self.sock = socket.create_connection(addr, timeout=1.0)
        self.sock.settimeout(None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader: Any = HttpReader() if http else hiredis.Reader(replyError=protocol.ReplyError)
        self.vc = vc
        self.key = addr


class _VClient:
    """One closed-loop virtual client: at most one request in flight."""

    def __init__(self, w: _Worker, idx: int) -> None:
        self.w = w
        self.idx = idx
        self.conns: dict[Any, _LoadConn] = {}
        self.sent = 0.0
        self.inflight: _LoadConn | None = None
        self.is_write = False
        self.ctx: Any = None
        self.sid = f"bench-{uuid.uuid4().hex[:12]}-{idx}".encode()
        self.seq = 0
        self.txn_args: list[bytes] | None = None  # the transaction being retried (TXNCONFLICT/TRYAGAIN)
        self.retries = 0
        self.op = ""

    def conn(self, addr: tuple[str, int]) -> _LoadConn:
        c = self.conns.get(addr)
        if c is None:
            c = self.conns[addr] = _LoadConn(addr, self, self.w.kind == "etcd")
            self.w.sel.register(c.sock, selectors.EVENT_READ, c)
        return c

    def drop(self, c: _LoadConn) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.w.sel.unregister(c.sock)
        with contextlib.suppress(OSError):
            c.sock.close()
        self.conns.pop(c.key, None)
        if self.inflight is c:
            self.inflight = None


class _Worker:
    """A worker process's event loop over its share of the virtual clients."""

    def __init__(self, spec: dict, p: LoadParams, client_ids: list[int], stop: Any = None) -> None:
        self.spec = spec
        self.kind = spec["kind"]
        self.p = p
        self.sel = selectors.DefaultSelector()
        self.keys = KeyGen(p.keyspace, p.dist, seed=p.seed * 1000 + (client_ids[0] if client_ids else 0))
        self.rng = random.Random(p.seed * 7919 + (client_ids[0] if client_ids else 0))
        self.value = make_value(p.value_size)
        self.hist = Hist()
        self.ops = 0
        self.errors: dict[str, int] = {}
        self.indeterminate = 0
        self.txn_retries = 0
        self.acked = 0
        self.maybe_applied = 0
        self.stamps = 0
        self.stop_event = stop
        self.vcs = [_VClient(self, i) for i in client_ids]
        self.measure_from = 0.0
        self.measure_to = 0.0
        if self.kind == "raftkv":
            self.map = ShardMap.load(spec["config"])
            self.nodes = {n: tuple(a) for n, a in spec["nodes"].items()}
            self.shard_cache: dict[bytes, int] = {}
            self.leaders: dict[int, str] = {}
            self.last_refresh = 0.0
            self.refresh_leaders(force=True)
        elif self.kind == "redis":
            self.addr = tuple(spec["addr"])
            with Connection(*self.addr) as conn:
                self.cas_sha = conn.call("SCRIPT", "LOAD", _REDIS_CAS).decode()
        else:  # etcd, through the JSON gateway or gRPC
            self.addrs = [tuple(a) for a in spec["addrs"]]
            self.member_of = {vc.idx: vc.idx % len(self.addrs) for vc in self.vcs}
            self.leader: int | None = spec.get("leader")
            self.last_refresh = 0.0
            self.vb64 = b64(self.value)

    # -- raftkv routing ----------------------------------------------------------------------
    def shard(self, k: bytes) -> int:
        s = self.shard_cache.get(k)
        if s is None:
            s = self.shard_cache[k] = self.map.shard_for_key(k)
        return s

    def refresh_leaders(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_refresh < 0.1:
            return
        self.last_refresh = now
        for n in self.rng.sample(list(self.nodes), len(self.nodes)):
            try:
                with Connection(*self.nodes[n], timeout=0.3) as conn:
                    rows = conn.call("RAFTKV.SHARDS")
            except OSError:
                continue
            if isinstance(rows, protocol.ReplyError):
                continue
            for s, leader, _term in rows:
                if leader is not None:
                    self.leaders[s] = leader.decode()
            if len(self.leaders) >= self.map.nshards:
                return

    def leader_addr(self, shard: int, vc: _VClient) -> tuple[str, int]:
        name = self.leaders.get(shard)
        if name is None:
            reps = self.map.replicas(shard)
            name = reps[(vc.idx + vc.seq) % len(reps)].name
        return self.nodes[name]

    # -- etcd routing ---------------------------------------------------------------------------
    def etcd_member(self, vc: _VClient) -> int:
        """Writes go to the leader when it is known; reads to the client's member."""
        return self.leader if vc.is_write and self.leader is not None else self.member_of[vc.idx]

    def etcd_failed(self, vc: _VClient) -> None:
        """After a failed request the client moves to the next member, and a write looks for the leader again."""
        self.member_of[vc.idx] = (self.member_of[vc.idx] + 1) % len(self.addrs)
        if vc.is_write:
            self.leader = None
            self.refresh_etcd_leader()

    def refresh_etcd_leader(self) -> None:
        now = time.monotonic()
        if now - self.last_refresh >= 0.1:
            self.last_refresh = now
            self.leader = find_leader(self.addrs, timeout=0.3)

    def keys_on_distinct_shards(self, n: int) -> list[bytes]:
        """``n`` keys spanning min(n, shards) shards (the first two always on different shards)."""
        want = min(n, self.map.nshards)
        while True:
            ks = self.distinct_keys(n)
            if len({self.shard(k) for k in ks}) >= want and self.shard(ks[0]) != self.shard(ks[1]) or want < 2:
                return ks

    def distinct_keys(self, n: int) -> list[bytes]:
        """``n`` different keys (etcd rejects a transaction that names a key twice)."""
        ks: list[bytes] = []
        while len(ks) < n:
            k = key_name(self.keys.next())
            if k not in ks:
                ks.append(k)
        return ks

    # -- building one request ------------------------------------------------------------------------
    def op_name(self) -> str:
        w = self.p.workload
        if w == "mix":
            return "put" if self.rng.random() < 0.5 else "get"
        return w

    def issue(self, vc: _VClient) -> None:
        """Send ``vc``'s next request (a connection failure counts as an error, and we try again later)."""
        if self.p.drain and time.perf_counter() >= self.measure_to:
            vc.inflight = None  # draining: nothing new is sent
            return
        retry = vc.txn_args is not None
        op = vc.op if retry else self.op_name()
        vc.op = op
        vc.is_write = op in WRITES
        try:
            conn, payload = getattr(self, f"_req_{self.kind}")(vc, op)
            if not retry:
                vc.sent = time.perf_counter()
            conn.sock.sendall(payload)
            vc.inflight = conn
        except OSError:
            self.error("CONN", vc, False, time.perf_counter())
            vc.inflight = None
            vc.txn_args = None
            for c in list(vc.conns.values()):
                vc.drop(c)
            if self.kind == "raftkv":
                self.leaders.clear()
            elif self.kind == "etcd":
                self.etcd_failed(vc)

    def _req_raftkv(self, vc: _VClient, op: str) -> tuple[_LoadConn, bytes]:
        enc = protocol.encode_command
        v = self.stamped() if self.p.stamp else self.value
        if op in ("mset2", "mset4", "txn"):
            # As Client.mset()/Client.txn(): RAFTKV.TXN with a fresh ID, sent to the first key's shard leader.
            if vc.txn_args is None:
                if op == "txn":
                    a, b = self.keys_on_distinct_shards(2)[:2]
                    vc.txn_args = [b"2", a, b"VALUE", v, b, b"VALUE", v, b"2", b"PUT", a, v, b"PUT", b, v, b"0"]
                else:
                    ks = self.keys_on_distinct_shards(2 if op == "mset2" else 4)
                    vc.txn_args = [b"0", b"%d" % len(ks)]
                    for k in ks:
                        vc.txn_args += [b"PUT", k, v]
                    vc.txn_args.append(b"0")
                vc.retries = 0
            shard = self.shard(vc.txn_args[1] if op == "txn" else vc.txn_args[3])
            vc.ctx = shard
            return vc.conn(self.leader_addr(shard, vc)), enc(b"RAFTKV.TXN", b"ID", uuid.uuid4().hex.encode(),
                                                            *vc.txn_args)
        k = (counter_name if op == "incr" else key_name)(self.keys.next())
        shard = self.shard(k)
        vc.ctx = shard
        if op == "get":
            return vc.conn(self.leader_addr(shard, vc)), enc(b"GET", k)
        if op == "stale_get":
            reps = self.map.replicas(shard)
            return vc.conn(self.nodes[reps[vc.idx % len(reps)].name]), enc(b"RAFTKV.STALEGET", k)
        vc.seq += 1
        if op == "put":
            inner: tuple = (b"SET", k, v)
        elif op == "cas":
            inner = (b"CAS", k, v, v)
        elif op == "incr":
            inner = (b"INCR", k)
        else:
            raise ValueError(f"unknown op {op}")
        return vc.conn(self.leader_addr(shard, vc)), enc(b"RAFTKV.REQ", vc.sid, b"%d" % vc.seq, *inner)

    def _req_redis(self, vc: _VClient, op: str) -> tuple[_LoadConn, bytes]:
        enc = protocol.encode_command
        v = self.value
        c = vc.conn(self.addr)
        if op in ("mset2", "mset4"):
            args = [b"MSET"]
            for k in self.distinct_keys(2 if op == "mset2" else 4):
                args += [k, v]
            return c, enc(*args)
        if op == "txn":
            return c, enc(b"EVALSHA", self.cas_sha, b"2", *self.distinct_keys(2), v, v, b"txn")
        if op == "incr":
            return c, enc(b"INCR", counter_name(self.keys.next()))
        k = key_name(self.keys.next())
        if op == "put":
            return c, enc(b"SET", k, v)
        if op in ("get", "stale_get"):
            return c, enc(b"GET", k)
        if op == "cas":
            return c, enc(b"EVALSHA", self.cas_sha, b"1", k, v, v)
        raise ValueError(f"unknown op {op}")

    def _req_etcd(self, vc: _VClient, op: str) -> tuple[_LoadConn, bytes]:
        host, port = self.addrs[self.etcd_member(vc)]
        c = vc.conn((host, port))
        v = self.vb64
        if op in ("mset2", "mset4", "txn"):
            ks = [b64(k) for k in self.distinct_keys(2 if op != "mset4" else 4)]
            cmp = [{"key": k, "result": "EQUAL", "target": "VALUE", "value": v} for k in ks] if op == "txn" else []
            body = {"compare": cmp, "success": [{"requestPut": {"key": k, "value": v}} for k in ks]}
            return c, http_request(host, port, "/v3/kv/txn", body)
        k = b64(key_name(self.keys.next()))
        if op == "put":
            return c, http_request(host, port, "/v3/kv/put", {"key": k, "value": v})
        if op == "get":
            return c, http_request(host, port, "/v3/kv/range", {"key": k})
        if op == "stale_get":
            return c, http_request(host, port, "/v3/kv/range", {"key": k, "serializable": True})
        if op == "cas":
            body = {"compare": [{"key": k, "result": "EQUAL", "target": "VALUE", "value": v}],
                    "success": [{"requestPut": {"key": k, "value": v}}]}
            return c, http_request(host, port, "/v3/kv/txn", body)
        raise ValueError(f"unknown op {op}")

    def stamped(self) -> bytes:
        """A value that starts with the time it is sent, ``b"%.6f <n> "`` (unique: ``n`` counts), padded with
        the configured value to at least ``value_size`` bytes."""
        self.stamps += 1
        head = b"%.6f %d " % (time.time(), self.stamps)
        return head + self.value[len(head):]

    # -- outcomes -------------------------------------------------------------------------------
    def in_window(self, sent: float, now: float) -> bool:
        return sent >= self.measure_from and now <= self.measure_to

    def error(self, code: str, vc: _VClient, maybe_applied: bool, now: float) -> None:
        self.maybe_applied += maybe_applied
        if not self.in_window(vc.sent, now) and vc.sent:
            return
        self.errors[code] = self.errors.get(code, 0) + 1
        if maybe_applied:
            self.indeterminate += 1

    def on_reply(self, vc: _VClient, reply: Any, now: float) -> None:
        vc.inflight = None
        if self.kind == "etcd":
            status, body = reply
            if status != 200:
                try:
                    code = "etcd:" + json.loads(body).get("error", str(status))[:40]
                except ValueError:
                    code = f"HTTP{status}"
                self.error(code, vc, vc.is_write and status >= 500, now)  # a 4xx was rejected, not applied
                self.etcd_failed(vc)
                return
        elif isinstance(reply, protocol.ReplyError):
            if vc.txn_args is not None and reply.code in ("TXNCONFLICT", "TRYAGAIN") and vc.retries < 10 \
                    and now < self.measure_to:
                vc.retries += 1  # as Txn.commit(retries=10): a definite abort, resent with a fresh ID
                self.txn_retries += 1
                return
            vc.txn_args = None
            self.error(reply.code, vc, reply.code == "UNKNOWN" and vc.is_write, now)
            if self.kind == "raftkv" and reply.code in RETRY_CODES:
                self.leaders.pop(vc.ctx, None)
                self.refresh_leaders()
            return
        vc.txn_args = None
        self.done(vc, now)

    def done(self, vc: _VClient, now: float) -> None:
        """``vc``'s request succeeded: its latency counts if it was sent and answered inside the window."""
        self.acked += 1
        if self.in_window(vc.sent, now):
            self.hist.record(now - vc.sent)
            self.ops += 1

    def on_conn_lost(self, c: _LoadConn, now: float) -> None:
        vc = c.vc
        if vc.inflight is c:
            self.error("CONN", vc, vc.is_write, now)
            vc.txn_args = None
        vc.drop(c)
        if self.kind == "raftkv":
            self.leaders.clear()
            self.refresh_leaders()
        elif self.kind == "etcd":
            self.etcd_failed(vc)

    # -- the loop -------------------------------------------------------------------------------
    def run(self, start_at: float, measure_from: float, measure_to: float) -> None:
        self.measure_from, self.measure_to = measure_from, measure_to
        while time.perf_counter() < start_at:
            time.sleep(min(0.01, max(0.0, start_at - time.perf_counter())))
        for vc in self.vcs:
            self.issue(vc)
        next_check = time.perf_counter() + 0.05
        while True:
            now = time.perf_counter()
            stopped = self.stop_event is not None and self.stop_event.is_set()
            if (now >= measure_to or stopped) and not (
                    self.p.drain and not stopped and now < measure_to + self.p.op_timeout
                    and any(vc.inflight is not None for vc in self.vcs)):
                break
            for key, _ in self.sel.select(0.05):
                c: _LoadConn = key.data
                try:
                    data = c.sock.recv(262144)
                except OSError:
                    data = b""
                now = time.perf_counter()
                if not data:
                    self.on_conn_lost(c, now)
                    self.issue(c.vc)
                    continue
                c.reader.feed(data)
                while True:
                    try:
                        reply = c.reader.gets()
                    except (hiredis.ProtocolError, ValueError, IndexError):
                        self.on_conn_lost(c, now)
                        break
                    if reply is False:
                        break
                    self.on_reply(c.vc, reply, now)
                    if now < measure_to:
                        self.issue(c.vc)
            now = time.perf_counter()
            if now >= next_check:
                next_check = now + 0.05
                for vc in self.vcs:
                    if vc.inflight is None:
                        self.issue(vc)  # a client whose last attempt could not even connect
                    elif now - vc.sent > self.p.op_timeout:
                        self.error("TIMEOUT", vc, vc.is_write, now)
                        vc.txn_args = None
                        vc.drop(vc.inflight)
                        self.issue(vc)
                if self.kind == "raftkv" and len(self.leaders) < self.map.nshards:
                    self.refresh_leaders()
                elif self.kind == "etcd" and self.leader is None:
                    self.refresh_etcd_leader()
        for vc in self.vcs:
            self.maybe_applied += vc.inflight is not None and vc.is_write  # still unanswered
            for c in list(vc.conns.values()):
                vc.drop(c)

    def result(self) -> dict:
        return {"hist": self.hist.to_dict(), "ops": self.ops, "errors": self.errors,
                "indeterminate": self.indeterminate, "txn_retries": self.txn_retries, "acked": self.acked,
                "maybe_applied": self.maybe_applied}


class _GrpcWorker(_Worker):
    """etcd through its native gRPC API: one asyncio loop, one coroutine per virtual client, one ``grpc.aio``
    channel per member shared by the process's clients."""

    # A write that failed with one of these may have been applied (the others were rejected before).
    MAYBE_APPLIED = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "UNKNOWN", "INTERNAL", "CANCELLED"}

    def run(self, start_at: float, measure_from: float, measure_to: float) -> None:
        self.measure_from, self.measure_to = measure_from, measure_to
        asyncio.run(self._run(start_at))

    def stopped(self) -> bool:
        return time.perf_counter() >= self.measure_to or (self.stop_event is not None and self.stop_event.is_set())

    async def _run(self, start_at: float) -> None:
        import grpc.aio

        self.rpc_error = grpc.aio.AioRpcError
        self.refreshing: asyncio.Task | None = None
        self.chans = [etcd_grpc.Channel(a) for a in self.addrs]
        try:
            await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
            tasks = [asyncio.create_task(self._client(vc)) for vc in self.vcs]
            while not self.stopped():
                if self.leader is None:
                    self.refresh_etcd_leader()
                await asyncio.sleep(0.05)
            for t in tasks:
                t.cancel()
            for r in await asyncio.gather(*tasks, return_exceptions=True):
                if isinstance(r, Exception):
                    raise r
        finally:
            for c in self.chans:
                await c.close()

    def _req_grpc(self, op: str) -> tuple[str, bytes]:
        """(the ``etcd_grpc.Channel`` method, the request) for one operation."""
        eg, v = etcd_grpc, self.value
        if op in ("mset2", "mset4", "txn"):
            ks = self.distinct_keys(2 if op != "mset4" else 4)
            cmp = [eg.compare_value(k, v) for k in ks] if op == "txn" else []
            return "txn", eg.txn_request(cmp, [(k, v) for k in ks])
        k = key_name(self.keys.next())
        if op == "put":
            return "put", eg.put_request(k, v)
        if op in ("get", "stale_get"):
            return "range", eg.range_request(k, serializable=op == "stale_get")
        if op == "cas":
            return "txn", eg.txn_request([eg.compare_value(k, v)], [(k, v)])
        raise ValueError(f"unknown op {op}")

    async def _client(self, vc: _VClient) -> None:
        """One closed-loop virtual client until the window closes."""
        while True:
            vc.op = self.op_name()
            vc.is_write = vc.op in WRITES
            method, req = self._req_grpc(vc.op)
            call = getattr(self.chans[self.etcd_member(vc)], method)
            vc.sent = time.perf_counter()
            try:
                rep = await call(req, timeout=self.p.op_timeout)
            except self.rpc_error as e:
                code = e.code().name
                self.error(f"grpc:{code}", vc, vc.is_write and code in self.MAYBE_APPLIED, time.perf_counter())
                self.etcd_failed(vc)
                await asyncio.sleep(0.01)  # a member that is down fails at once: no busy loop
                continue
            if method == "txn" and not rep:  # the values never change, so every compare must hold
                self.error("etcd:compare failed", vc, False, time.perf_counter())
            else:
                self.done(vc, time.perf_counter())

    def refresh_etcd_leader(self) -> None:
        """As the JSON driver's, but asking each member's Maintenance/Status over gRPC without blocking."""
        now = time.monotonic()
        if now - self.last_refresh >= 0.1 and (self.refreshing is None or self.refreshing.done()):
            self.last_refresh = now
            self.refreshing = asyncio.ensure_future(self._find_leader())

    async def _find_leader(self) -> None:
        async def status(c: etcd_grpc.Channel) -> tuple[int, int] | None:
            try:
                return await c.status(b"", timeout=0.3)
            except self.rpc_error:
                return None

        self.leader = leader_index(list(await asyncio.gather(*(status(c) for c in self.chans))))


_REDIS_CAS = """
if ARGV[3] == 'txn' then
  if redis.call('get', KEYS[1]) == ARGV[1] and redis.call('get', KEYS[2]) == ARGV[1] then
    redis.call('set', KEYS[1], ARGV[2]); redis.call('set', KEYS[2], ARGV[2]); return 1
  end
  return 0
end
if redis.call('get', KEYS[1]) == ARGV[1] then redis.call('set', KEYS[1], ARGV[2]); return 1 end
return 0
"""


def _client_thread(spec: dict, p: LoadParams, idx: int, t: dict, out: dict, lock: threading.Lock,
                   client: Any) -> None:
    """One ``raftkv.Client`` thread (``via="client"``)."""
    keys = KeyGen(p.keyspace, p.dist, seed=p.seed * 1000 + idx)
    rng = random.Random(idx)
    v = make_value(p.value_size)
    hist, ops, errors, indet = Hist(), 0, {}, 0
    while time.perf_counter() < t["start"]:
        time.sleep(0.005)
    while True:
        op = p.workload if p.workload != "mix" else ("put" if rng.random() < 0.5 else "get")
        k = key_name(keys.next())
        sent = time.perf_counter()
        if sent >= t["to"]:
            break
        try:
            if op == "put":
                client.put(k, v)
            elif op == "get":
                client.get(k)
            elif op == "stale_get":
                client.stale_get(k)
            elif op == "cas":
                client.cas(k, v, v)
            elif op == "incr":
                client.incr(counter_name(keys.next()))
            elif op in ("mset2", "mset4"):
                client.mset({key_name(keys.next()): v for _ in range(2 if op == "mset2" else 4)})
            elif op == "txn":
                a, b = key_name(keys.next()), key_name(keys.next())
                client.txn().if_value(a, v).if_value(b, v).then_put(a, v).then_put(b, v).commit(retries=10)
            else:
                raise ValueError(f"workload {op} is not supported with --via client")
            ok = True
        except IndeterminateError:
            ok, code, indet_inc = False, "UNKNOWN", 1
        except RaftKVError as e:
            ok, code, indet_inc = False, e.code, 0
        now = time.perf_counter()
        if sent >= t["from"] and now <= t["to"]:
            if ok:
                hist.record(now - sent)
                ops += 1
            else:
                errors[code] = errors.get(code, 0) + 1
                indet += indet_inc
    with lock:
        out["hist"].merge(hist)
        out["ops"] += ops
        out["indeterminate"] += indet
        for c, n in errors.items():
            out["errors"][c] = out["errors"].get(c, 0) + n


def _worker_main(spec: dict, p: LoadParams, client_ids: list[int], times: tuple[float, float, float],
                 q: Any, stop: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cpu0 = os.times()
    try:
        if p.via == "client":
            client = Client(cluster=spec["config"], timeout=p.op_timeout)
            out = {"hist": Hist(), "ops": 0, "errors": {}, "indeterminate": 0}
            lock = threading.Lock()
            t = {"start": times[0], "from": times[1], "to": times[2]}
            threads = [threading.Thread(target=_client_thread, args=(spec, p, i, t, out, lock, client))
                       for i in client_ids]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            res = {"hist": out["hist"].to_dict(), "ops": out["ops"], "errors": out["errors"],
                   "indeterminate": out["indeterminate"]}
        else:
            w = (_GrpcWorker if spec["kind"] == "etcd-grpc" else _Worker)(spec, p, client_ids, stop)
            w.run(*times)
            res = w.result()
    except Exception as e:  # noqa: BLE001 - report to the parent rather than hang it
        res = {"failed": f"{type(e).__name__}: {e}"}
    cpu1 = os.times()
    res["cpu_s"] = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    q.put(res)


def default_procs(clients: int) -> int:
    """Worker processes for ``clients`` virtual clients: one per CPU, never more than the clients."""
    return max(1, min(clients, os.cpu_count() or 1))


class LoadRun:
    """A load run in worker processes; ``start()`` returns at once, ``finish()`` merges the results."""

    def __init__(self, system: System | dict, p: LoadParams, name: str | None = None) -> None:
        self.spec = system.spec() if isinstance(system, System) else system
        self.name = name or (system.name if isinstance(system, System) else self.spec["kind"])
        self.pids = system.pids() if isinstance(system, System) else []
        self.p = p
        self.procs = p.procs or default_procs(p.clients)
        ctx = mp.get_context("fork")
        self.q = ctx.Queue()
        self.stop_event = ctx.Event()
        now = time.perf_counter()
        self.start_at = now + 0.3 + 0.05 * self.procs
        self.measure_from = self.start_at + p.warmup
        self.measure_to = self.measure_from + p.duration
        share = [[i for i in range(p.clients) if i % self.procs == w] for w in range(self.procs)]
        self.workers = [ctx.Process(target=_worker_main, daemon=True,
                                    args=(self.spec, p, ids, (self.start_at, self.measure_from, self.measure_to),
                                          self.q, self.stop_event))
                        for ids in share]

    def start(self) -> LoadRun:
        for w in self.workers:
            w.start()
        return self

    def stop(self) -> None:
        """End early (the failover benchmark); the window closes now."""
        self.measure_to = min(self.measure_to, time.perf_counter())
        self.stop_event.set()

    def finish(self) -> Result:
        cpu0 = None
        while time.perf_counter() < self.measure_to and not self.stop_event.is_set():
            now = time.perf_counter()
            if cpu0 is None and now >= self.measure_from:
                cpu0 = (now, sum(proc_cpu_s(pid) for pid in self.pids))
            time.sleep(min(0.05, max(0.001, (self.measure_from if cpu0 is None else self.measure_to) - now)))
        server_cpu = None
        if cpu0 is not None and self.pids:
            t1 = time.perf_counter()
            server_cpu = round((sum(proc_cpu_s(pid) for pid in self.pids) - cpu0[1]) / max(1e-6, t1 - cpu0[0]), 2)
        results = [self.q.get(timeout=self.p.op_timeout + 60) for _ in self.workers]
        for w in self.workers:
            w.join(10)
        failed = [r["failed"] for r in results if "failed" in r]
        if failed:
            raise RuntimeError(f"load generator worker failed: {failed[0]}")
        hist = Hist()
        errors: dict[str, int] = {}
        ops = indet = 0
        retries = sum(r.get("txn_retries", 0) for r in results)
        for r in results:
            hist.merge(Hist.from_dict(r["hist"]))
            ops += r["ops"]
            indet += r["indeterminate"]
            for c, n in r["errors"].items():
                errors[c] = errors.get(c, 0) + n
        seconds = max(1e-6, self.measure_to - self.measure_from)
        cpu = sum(r["cpu_s"] for r in results)
        gen = {"procs": self.procs, "clients_per_proc": math.ceil(self.p.clients / self.procs),
               "via": self.p.via, "cpu_s_per_s": round(cpu / (seconds + self.p.warmup), 2)}
        return Result(self.name, self.p.workload, self.p.clients, ops, round(seconds, 3), round(ops / seconds, 1),
                      _r(hist.quantile(0.5)), _r(hist.quantile(0.99)), _r(hist.quantile(0.999)),
                      sum(errors.values()), indet, errors, gen, retries, server_cpu, hist.to_dict(),
                      sum(r.get("acked", 0) for r in results), sum(r.get("maybe_applied", 0) for r in results))


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def run_load(system: System | dict, p: LoadParams, name: str | None = None) -> Result:
    """Drive ``system`` with ``p`` and wait for the result."""
    return LoadRun(system, p, name).start().finish()
