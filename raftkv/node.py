"""A raftkv node process: hosts shard replicas and serves clients over RESP.

Theory of operation
-------------------
A node hosts one ``ShardReplica`` per shard placed on it and one client port.
A client command names keys; the ring maps each key to its shard.  For a shard
this node leads, the command joins the shard's ``Proposer`` batch: everything
that arrives in one event-loop turn becomes ONE Raft entry (group commit of the
log write, the replication round trip and the fsync).  Otherwise the node
forwards the command to the node its replica names as leader, over a pipelined
RESP connection (one hop, with a hop limit so forwarding never loops).

Linearizable reads go through the log like writes (inside the same batches),
so a deposed leader, which cannot commit, can never answer from a stale copy.
Stale reads (``READONLY`` connections, ``RAFTKV.STALEGET``) read the local
replica and say so by being asked for explicitly.

Every outcome is one of: applied (reply with the result), not applied (safe to
retry; the node retries internally until ``request_timeout_s``), or unknown
(``-UNKNOWN``: the write may or may not have happened).  Writes wrapped in a
client session (``RAFTKV.REQ sid seq ...``) are de-duplicated by the state
machine, so the node may retry those internally even after an unknown outcome.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import hiredis

from raftkv import coordinator, protocol, txncmds
from raftkv.metrics import NodeMetrics, disk_free_ratio, serve_http, txn_summary
from raftkv.protocol import OK, PONG, Error, Raw
from raftkv.replica import APPLIED, NOT_APPLIED, UNKNOWN, ShardReplica
from raftkv.security import Security, check_bind
from raftkv.state import CmdError, Locked
from shards.shardmap import ShardMap

log = logging.getLogger("raftkv.node")


@dataclass(frozen=True)
class Limits:
    """Protective limits of a node; every one answers with a clear error."""

    request_bytes_max: int = 1536 * 1024  # like etcd's --max-request-bytes (1.5 MiB)
    key_bytes_max: int = 64 * 1024
    value_bytes_max: int = 1024 * 1024
    clients_max: int = 10_000
    pipeline_depth_max: int = 1024  # in-flight commands per connection (back-pressure beyond)
    idle_timeout_s: float = 0.0  # 0 = never close idle connections (Redis default)
    batch_cmds_max: int = 2048


@dataclass(frozen=True)
class Timing:
    request_timeout_s: float = 5.0  # give up (unknown/noquorum) after this long
    leader_wait_s: float = 3.0  # how long to wait for a shard to elect a leader
    retry_sleep_s: float = 0.02


class Proposer:
    """Batches commands for one shard into Raft entries (runs on the event loop)."""

    def __init__(self, replica: ShardReplica, loop: asyncio.AbstractEventLoop, batch_max: int,
                 outcomes: Any = None) -> None:
        self.replica = replica
        self.outcomes = outcomes  # counter with labels (shard, outcome), or None
        self.loop = loop
        self.batch_max = batch_max
        self.pending: list[tuple[tuple, asyncio.Future]] = []
        self.scheduled = False

    def submit(self, cmd: tuple) -> asyncio.Future:
        fut = self.loop.create_future()
        self.pending.append((cmd, fut))
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        self.scheduled = False
        while self.pending:
            batch, self.pending = self.pending[: self.batch_max], self.pending[self.batch_max:]
            cmds = [c for c, _ in batch]
            futs = [f for _, f in batch]
            def done(kind: str, res: Any, futs: list = futs, loop: asyncio.AbstractEventLoop = self.loop) -> None:
                if self.outcomes is not None:
                    self.outcomes.labels(str(self.replica.shard), kind).inc(len(futs))
                loop.call_soon_threadsafe(_resolve, futs, kind, res)

            self._send(cmds, done)

    def _send(self, cmds: list, done: Any) -> None:
        self.replica.propose(cmds, int(time.time() * 1000), done)


class Reader(Proposer):
    """Batches linearizable reads for one shard behind one ReadIndex round (no log entry).

    The replica confirms its leadership with a majority after the reads arrived
    and waits until everything committed before is applied; the reads then run
    against the state on the tick thread, where it is consistent.
    """

    def _send(self, cmds: list, done: Any) -> None:
        state_of = self.replica

        def confirmed(ok: bool, reason: str) -> None:
            if ok:
                state = state_of.state
                done(APPLIED, [state.read(c) for c in cmds])
            else:
                done(NOT_APPLIED, reason)  # the read did not happen; safe to retry

        self.replica.read_barrier(confirmed)


def _resolve(futs: list[asyncio.Future], kind: str, res: Any) -> None:
    if kind == APPLIED:
        for f, r in zip(futs, res, strict=True):
            if not f.done():
                f.set_result((APPLIED, r))
    else:
        for f in futs:
            if not f.done():
                f.set_result((kind, res))


class PeerLink:
    """One pipelined RESP connection to another node, for forwarding."""

    def __init__(self, host: str, port: int, ssl_ctx: Any = None, credentials: list[bytes] | None = None) -> None:
        self.host, self.port = host, port
        self.ssl = ssl_ctx
        self.credentials = credentials
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.waiting: list[asyncio.Future] = []
        self.lock = asyncio.Lock()
        self.pump: asyncio.Task | None = None

    async def call(self, args: list[bytes], timeout: float) -> Any:
        """Send one command and wait for its reply; raises ConnectionError/TimeoutError."""
        async with self.lock:
            if self.writer is None or self.writer.is_closing():
                self.reader, self.writer = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port, ssl=self.ssl), timeout=min(timeout, 1.0))
                self.pump = asyncio.create_task(self._pump(self.reader))
                if self.credentials:
                    # Pipelined ahead of the first command; its reply is checked by that command's caller.
                    auth = asyncio.get_running_loop().create_future()
                    self.waiting.append(auth)
                    self.writer.write(protocol.encode_command(*self.credentials))
            fut = asyncio.get_running_loop().create_future()
            self.waiting.append(fut)
            self.writer.write(protocol.encode_command(*args))
        return await asyncio.wait_for(fut, timeout)

    async def _pump(self, reader: asyncio.StreamReader) -> None:
        parser = protocol.reply_reader()
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                parser.feed(data)
                while (reply := parser.gets()) is not False:
                    fut = self.waiting.pop(0)
                    if not fut.done():
                        fut.set_result(reply)
        except (ConnectionError, hiredis.ProtocolError, IndexError):
            pass
        finally:
            waiting, self.waiting = self.waiting, []
            for fut in waiting:
                if not fut.done():
                    fut.set_exception(ConnectionError(f"connection to {self.host}:{self.port} lost"))
            if self.writer is not None:
                self.writer.close()
            self.writer = None


class Conn:
    """Per-connection state."""

    __slots__ = ("readonly", "peer", "resp3", "txn", "authed", "last_write")

    def __init__(self, peer: str, authed: bool = True) -> None:
        self.authed = authed
        # The newest write still in flight on this connection: a pipelined read
        # waits for it, so a connection reads its own writes (Redis pipeline order).
        self.last_write: asyncio.Future | None = None
        self.readonly = False
        self.peer = peer
        self.resp3 = False
        self.txn = None  # WATCH/MULTI state (raftkv.txncmds.ConnTxn)


class Node:
    """A node: replicas of its shards plus the RESP server."""

    def __init__(self, shardmap: ShardMap, name: str, limits: Limits | None = None,
                 timing: Timing | None = None, unsafe_local_reads: bool = False,
                 raft_overrides: dict | None = None, metrics_port: int | None = None,
                 security: Security | None = None, insecure: bool = False) -> None:
        if name not in shardmap.nodes:
            raise ValueError(f"node {name!r} is not in the cluster file (nodes: {', '.join(shardmap.nodes)})")
        self.map = shardmap
        self.name = name
        self.info = shardmap.nodes[name]
        self.limits = limits or Limits()
        self.timing = timing or Timing()
        # Deliberately unsafe mode for the fault harness: serve reads from the
        # local copy without proving leadership.  Never use it for real data.
        self.unsafe_local_reads = unsafe_local_reads
        self.security = security or Security.from_config(shardmap.security)
        check_bind([self.info.host], self.security, insecure)
        if self.security.secret:
            raft_overrides = {**(raft_overrides or {}), "password": self.security.secret}
        self.replicas: dict[int, ShardReplica] = {}
        data_dir = shardmap.node_data_dir(name)
        for shard in shardmap.shards_on(name):
            peers = [n.raft_addr(shard) for n in shardmap.replicas(shard) if n.name != name]
            self.replicas[shard] = ShardReplica(
                shard, self.info.raft_addr(shard), peers, os.path.join(data_dir, f"shard-{shard}"),
                on_role_change=self._role_changed, conf_overrides=raft_overrides)
        self.proposers: dict[int, Proposer] = {}
        self.peers: dict[str, PeerLink] = {}
        self.clients = 0
        self.started = time.time()
        self.stats = {"commands": 0, "errors": 0, "forwarded": 0}
        self.metrics = NodeMetrics(self)
        self.leader_changes = {s: collections.deque(maxlen=64) for s in self.replicas}
        for shard in self.replicas:
            self.metrics.leader_changes.labels(str(shard))  # export 0 before the first change
        self.metrics_port = metrics_port if metrics_port is not None else self.info.metrics_port

    def _role_changed(self, shard: int, old: int, new: int) -> None:
        # Runs on the shard's tick thread: only thread-safe work here (deque.append is atomic).
        if new == 2 or old == 2:
            self.metrics.leader_changes.labels(str(shard)).inc()
            self.leader_changes[shard].append(time.monotonic())

    # -- serving -------------------------------------------------------------
    async def serve(self, ready: asyncio.Event | None = None) -> None:
        loop = asyncio.get_running_loop()
        self.proposers = {s: Proposer(r, loop, self.limits.batch_cmds_max, self.metrics.proposals)
                          for s, r in self.replicas.items()}
        self.readers = {s: Reader(r, loop, self.limits.batch_cmds_max) for s, r in self.replicas.items()}
        if self.metrics_port:
            await serve_http(self, self.metrics, self.info.host, self.metrics_port)
            log.info("event=metrics node=%s addr=http://%s:%d/metrics", self.name, self.info.host,
                     self.metrics_port)
        coordinator.start(self)  # 2PC recovery: finish open records, resolve old locks
        _membership.start(self)  # leader balancer, if 'serve --balance-leaders' asked for it
        server = await asyncio.start_server(self._handle, self.info.host, self.info.client_port,
                                            limit=1 << 20, backlog=1024, ssl=self.security.server_ssl())
        log.info("event=serving node=%s addr=%s:%d shards=%s", self.name, self.info.host,
                 self.info.client_port, sorted(self.replicas))
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):
                pass
        if ready is not None:
            ready.set()
        async with server:
            await stop.wait()
        log.info("event=stopping node=%s", self.name)

    def close(self) -> None:
        for r in self.replicas.values():
            r.destroy()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername")
        conn = Conn(f"{peername[0]}:{peername[1]}" if peername else "?", not self.security.auth_required)
        if self.clients >= self.limits.clients_max:
            writer.write(protocol.encode(Error("BUSY", f"max number of clients reached ({self.limits.clients_max})")))
            writer.close()
            return
        self.clients += 1
        parser = protocol.RequestParser(self.limits.request_bytes_max)
        replies: asyncio.Queue = asyncio.Queue(maxsize=2 * self.limits.pipeline_depth_max)
        writer_task = asyncio.create_task(self._write_replies(replies, writer, conn))
        idle = self.limits.idle_timeout_s or None
        try:
            while True:
                try:
                    data = await asyncio.wait_for(reader.read(65536), idle)
                except TimeoutError:
                    await replies.put(Error("ERR", f"idle for more than {idle:g} s (idle_timeout_s); closing"))
                    break
                if not data:
                    break
                parser.feed(data)
                try:
                    reqs = parser.requests()
                except protocol.ProtocolError as e:
                    await replies.put(Error("PROTO", f"Protocol error: {e}"))
                    break
                except protocol.RequestTooBig as e:
                    await replies.put(Error("TOOBIG", str(e)))
                    break
                for req in reqs:
                    if replies.qsize() >= self.limits.pipeline_depth_max:
                        # Over the in-flight limit: refuse this command (the queue keeps one slot
                        # per refusal, so a client that never reads is throttled by TCP after that).
                        await replies.put(Error("BUSY", f"more than {self.limits.pipeline_depth_max} commands "
                                                        "in flight on this connection (pipeline_depth_max); "
                                                        "read replies before sending more"))
                        continue
                    await replies.put((self._ordered_dispatch(conn, req), req[0], time.perf_counter()))
                if parser.broken:
                    await replies.put(Error("PROTO", f"Protocol error: {parser.broken}"))
                    break
        except (ConnectionError, OSError):
            pass
        finally:
            await replies.put(None)
            try:
                await writer_task
            except (ConnectionError, OSError):
                pass
            writer.close()
            self.clients -= 1

    def _ordered_dispatch(self, conn: Conn, req: list[bytes]) -> Any:
        """``dispatch``, but reads wait for this connection's earlier writes to finish."""
        name = req[0].upper()
        pending = conn.last_write
        if name in _READ_COMMANDS:
            if pending is not None and not pending.done():
                async def after_writes() -> Any:
                    await asyncio.wait([pending])
                    reply = self.dispatch(conn, req)
                    return await reply if asyncio.isfuture(reply) else reply
                return self.run(after_writes())
            return self.dispatch(conn, req)
        reply = self.dispatch(conn, req)
        if asyncio.isfuture(reply):
            conn.last_write = reply
        return reply

    async def _write_replies(self, replies: asyncio.Queue, writer: asyncio.StreamWriter, conn: Conn) -> None:
        while True:
            item = await replies.get()
            if item is None:
                break
            name = None
            if type(item) is tuple:
                item, name, started = item
            if asyncio.isfuture(item):
                try:
                    item = await item
                except Exception as e:  # a bug in a handler must not kill the connection
                    log.exception("event=handler_error")
                    item = Error("ERR", f"internal error: {type(e).__name__}: {e}")
            if isinstance(item, Error):
                self.stats["errors"] += 1
                self.metrics.errors.labels(item.code).inc()
            if name is not None:
                cmd = name.upper() if name.upper() in COMMANDS else b"unknown"
                self.metrics.requests.labels(cmd.decode().lower()).observe(time.perf_counter() - started)
            writer.write(protocol.encode(item, conn.resp3))
            if replies.empty():
                await writer.drain()
        await writer.drain()

    # -- dispatch ----------------------------------------------------------------
    def dispatch(self, conn: Conn, req: list[bytes], hops: int = 0) -> Any:
        """Reply value, or a future of one.  Futures start now, so order is kept."""
        self.stats["commands"] += 1
        name = req[0].upper()
        if conn.txn is not None and conn.txn.queuing and name not in txncmds.CONTROL:
            # Inside MULTI (which needed auth): queue for EXEC; unknown commands abort EXEC.
            return txncmds.queue(self, conn, req, name)
        spec = COMMANDS.get(name)
        if spec is None:
            return Error("ERR", f"unknown command '{req[0].decode(errors='replace')}'")
        arity, method = spec
        n = len(req)
        if (arity >= 0 and n != arity) or (arity < 0 and n < -arity):
            return Error("WRONGARGS", f"wrong number of arguments for '{name.decode().lower()}' command")
        if not conn.authed and name not in _NO_AUTH_NEEDED:
            return Error("NOAUTH", "Authentication required.")
        try:
            return method(self, conn, req, hops)
        except _BadRequest as e:
            return e.error

    def _check_key(self, key: bytes) -> None:
        if len(key) > self.limits.key_bytes_max:
            raise _BadRequest(Error("TOOBIG", f"key of {len(key)} bytes exceeds key_bytes_max={self.limits.key_bytes_max}"))

    def _check_value(self, value: bytes) -> None:
        if len(value) > self.limits.value_bytes_max:
            raise _BadRequest(Error("TOOBIG",
                                    f"value of {len(value)} bytes exceeds value_bytes_max={self.limits.value_bytes_max}"))

    def shard_of(self, key: bytes) -> int:
        self._check_key(key)
        return self.map.shard_for_key(key)

    def run(self, coro: Any) -> asyncio.Future:
        return asyncio.ensure_future(coro)

    # -- the core: run one state-machine command on its shard's leader -----------
    async def execute(self, shard: int, cmd: tuple, req: list[bytes], hops: int, *,
                      read: bool = False, idempotent: bool = False) -> Any:
        """Run ``cmd`` on ``shard``: locally when leading, else forward ``req``.

        ``read``: the command changes nothing, so any failure may be retried.
        ``idempotent``: the command is session-wrapped, so even an unknown
        outcome may be retried (the state machine de-duplicates).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timing.request_timeout_s
        no_leader_since: float | None = None
        retryable = read or idempotent
        while True:
            now = loop.time()
            replica = self.replicas.get(shard)
            if replica is not None and replica.is_leader():
                no_leader_since = None
                fut = (self.readers if read else self.proposers)[shard].submit(cmd)
                try:
                    kind, res = await asyncio.wait_for(fut, max(0.05, deadline - now))
                except TimeoutError:
                    kind, res = UNKNOWN, "timeout"
                if kind == APPLIED:
                    if isinstance(res, Locked):
                        # Until the transaction resolves, wait and retry (reads and writes alike);
                        # a lock older than the lock timeout is resolved at its home shard.
                        if loop.time() > deadline:
                            return Error("LOCKED", f"key {res.key!r} is locked by transaction {res.txid}")
                        if coordinator.lock_is_old(res):
                            await asyncio.wait([coordinator.service(self).resolve_soon(shard, res)],
                                               timeout=max(0.05, deadline - loop.time()))
                        await asyncio.sleep(self.timing.retry_sleep_s)
                        continue
                    return res
                if kind == UNKNOWN and not retryable:
                    return Error("UNKNOWN", f"shard {shard}: outcome unknown ({res}); the write may or may not "
                                            "have been applied")
                if loop.time() > deadline:
                    if kind == UNKNOWN:
                        return Error("UNKNOWN", f"shard {shard}: outcome unknown ({res}) after retries")
                    return Error("TRYAGAIN", f"shard {shard}: not applied ({res}); retry")
                await asyncio.sleep(self.timing.retry_sleep_s)
                continue
            # Not the leader here: find one to forward to.
            target = self._leader_node(shard)
            if target is not None and target != self.name and hops < 2:
                no_leader_since = None
                reply = await self._forward(target, req, hops, deadline - now)
                if isinstance(reply, _ForwardFailed):
                    if not retryable and reply.sent:
                        return Error("UNKNOWN", f"shard {shard}: lost contact with leader {target} after "
                                                "sending; the write may or may not have been applied")
                    if loop.time() > deadline:
                        return Error("TRYAGAIN", f"shard {shard}: leader {target} unreachable; retry")
                    await asyncio.sleep(self.timing.retry_sleep_s)
                    continue
                if isinstance(reply, Error) and reply.code in ("MOVED", "TRYAGAIN", "NOQUORUM") \
                        and loop.time() < deadline:
                    await asyncio.sleep(self.timing.retry_sleep_s)
                    continue
                return reply
            if hops >= 2 or (target == self.name and replica is None):
                return Error("MOVED", f"{shard} this node does not lead shard {shard}")
            # No leader known.
            if no_leader_since is None:
                no_leader_since = now
            if now - no_leader_since > self.timing.leader_wait_s or now > deadline:
                return Error("NOQUORUM", f"shard {shard} has no leader (waited {now - no_leader_since:.1f} s); "
                                         "is a majority of its replicas up and connected?")
            await asyncio.sleep(self.timing.retry_sleep_s)

    async def leader_elsewhere(self, shard: int, req: list[bytes], hops: int) -> Any:
        """None once this node's replica of ``shard`` leads; otherwise the reply of
        forwarding ``req`` to the leader (or an error when there is none in time).

        For commands that must act on the leader's replica itself (membership,
        backup dumps, leadership transfer) rather than through a log entry.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timing.request_timeout_s
        while True:
            replica = self.replicas.get(shard)
            if replica is not None and replica.is_leader():
                return None
            leader = self._leader_node(shard)
            if leader is not None and leader != self.name and hops < 2:
                reply = await self._forward(leader, req, hops, max(0.1, deadline - loop.time()))
                if isinstance(reply, _ForwardFailed):
                    return Error("TRYAGAIN", f"shard {shard}: leader {leader} unreachable; retry")
                return reply
            if loop.time() > deadline:
                return Error("NOQUORUM", f"shard {shard} has no leader; retry")
            await asyncio.sleep(0.05)

    def _leader_node(self, shard: int) -> str | None:
        replica = self.replicas.get(shard)
        if replica is not None:
            addr = replica.leader_addr()
            return None if addr is None else self.map.node_for_raft_addr(addr)
        # Not hosted here: forward to a replica node; it forwards on to its leader.
        names = [n.name for n in self.map.replicas(shard)]
        return names[0] if names else None

    async def _forward(self, target: str, req: list[bytes], hops: int, timeout: float) -> Any:
        link = self.peers.get(target)
        if link is None:
            info = self.map.nodes[target]
            link = self.peers[target] = PeerLink(info.host, info.client_port, self.security.peer_ssl(),
                                                 self.security.peer_credentials())
        self.stats["forwarded"] += 1
        sent = False
        try:
            fwd = [b"RAFTKV.FWD", str(hops + 1).encode(), *req]
            sent = True
            reply = await link.call(fwd, max(0.05, timeout))
        except (ConnectionError, OSError, TimeoutError) as e:
            return _ForwardFailed(sent and not isinstance(e, ConnectionRefusedError))
        if isinstance(reply, protocol.ReplyError):  # RAFTKV.FWD itself failed
            return Error(reply.code, reply.message)
        # The peer's reply arrives encoded inside a bulk string, so simple strings,
        # errors and nils pass through exactly.
        value = protocol.decode_reply(reply)
        if isinstance(value, protocol.ReplyError):
            return Error(value.code, value.message)
        return Raw(reply, _from_reply(value))

    # -- helpers for commands ------------------------------------------------------
    async def _stale_read(self, shard: int, cmd: tuple, req: list[bytes], hops: int) -> Any:
        replica = self.replicas.get(shard)
        if replica is None:
            return await self.execute(shard, cmd, req, hops, read=True)
        key = cmd[1]
        entry = replica.state.peek(key)
        if cmd[0] == "get":
            return None if entry is None else entry[0]
        return entry

    def status(self) -> dict:
        shards = {}
        for s, r in sorted(self.replicas.items()):
            st = r.status()
            leader = r.leader_addr()
            open_txns, oldest_txn = txn_summary(r.state.txns, int(time.time() * 1000))
            peers = {}
            for n in self.map.replicas(s):
                if n.name == self.name:
                    continue
                addr = n.raft_addr(s)
                peers[n.name] = {
                    "connected": bool(st.get(f"partner_node_status_server_{addr}", 0) == 2),
                    "match_idx": st.get(f"match_idx_server_{addr}"),
                }
            shards[str(s)] = {
                "role": {0: "follower", 1: "candidate", 2: "leader"}.get(st["state"], str(st["state"])),
                "leader": None if leader is None else self.map.node_for_raft_addr(leader),
                "term": st["raft_term"],
                "commit_idx": st["commit_idx"],
                "last_applied": st["last_applied"],
                "log_len": st.get("log_len"),
                "keys": st["keys"],
                "revision": st["revision"],
                "peers": peers,
                "leader_changes_1m": sum(1 for t in list(self.leader_changes[s]) if t > time.monotonic() - 60),
                "txns_open": open_txns,
                "oldest_txn_age_s": oldest_txn,
                "ticking": r.tick_thread_alive(),
            }
        return {"node": self.name, "epoch": self.map.epoch, "pid": os.getpid(),
                "disk_free_ratio": round(disk_free_ratio(self.map.node_data_dir(self.name)), 4),
                "uptime_s": round(time.time() - self.started, 1), "clients": self.clients,
                "stats": dict(self.stats), "shards": shards}


class _BadRequest(Exception):
    def __init__(self, error: Error) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass(frozen=True)
class _ForwardFailed:
    sent: bool




def _from_reply(reply: Any) -> Any:
    """A forwarded node's reply, back into our reply values."""
    if isinstance(reply, protocol.ReplyError):
        return Error(reply.code, reply.message)
    if isinstance(reply, list):
        return [_from_reply(r) for r in reply]
    return reply


def _result_to_reply(res: Any, convert: Any = None) -> Any:
    """A state-machine result (or a forwarded reply) as the reply to send."""
    if isinstance(res, Raw):
        return res
    if isinstance(res, CmdError):
        return Error(res.code, res.message)
    if convert is not None and not isinstance(res, Error):
        return convert(res)
    return res


# -- commands ----------------------------------------------------------------------

def _cmd_ping(node: Node, conn: Conn, req: list[bytes], hops: int) -> Any:
    return PONG if len(req) == 1 else req[1]


def _cmd_echo(node: Node, conn: Conn, req: list[bytes], hops: int) -> Any:
    return req[1]


def _cmd_get(node: Node, conn: Conn, req: list[bytes], hops: int) -> Any:
    key = req[1]
    shard = node.shard_of(key)
    cmd = ("get", key)
    if conn.readonly or node.unsafe_local_reads:
        return node.run(node._stale_read(shard, cmd, req, hops))
    return node.run(_finish(node.execute(shard, cmd, req, hops, read=True)))


def _cmd_staleget(node: Node, conn: Conn, req: list[bytes], hops: int) -> Any:
    key = req[1]
    return node.run(node._stale_read(node.shard_of(key), ("get", key), req, hops))


async def _finish(aw: Any) -> Any:
    return _result_to_reply(await aw)


def _write(node: Node, req: list[bytes], hops: int, shard: int, cmd: tuple, session: tuple | None,
           convert: Any = None) -> Any:
    if session is not None:
        cmd = ("session", session[0], session[1], cmd)

    async def go() -> Any:
        res = await node.execute(shard, cmd, req, hops, idempotent=session is not None)
        return _result_to_reply(res, convert)
    return node.run(go())


def _cmd_set(node: Node, conn: Conn, req: list[bytes], hops: int, session: tuple | None = None) -> Any:
    if len(req) != 3:
        return Error("ERR", "SET options (EX, NX, XX, ...) are not supported; use SET key value")
    key, value = req[1], req[2]
    shard = node.shard_of(key)
    node._check_value(value)
    return _write(node, req, hops, shard, ("set", key, value), session, lambda _rev: OK)


def _cmd_del(node: Node, conn: Conn, req: list[bytes], hops: int, session: tuple | None = None) -> Any:
    keys = req[1:]
    by_shard = _group(node, keys)
    if len(by_shard) == 1:
        ((shard, ks),) = by_shard.items()
        return _write(node, req, hops, shard, ("del", ks), session)

    # Keys on several shards: one DEL per shard (not atomic across shards; MSET/TXN are).
    async def go() -> Any:
        parts = await asyncio.gather(*[
            node.execute(s, ("del", ks), [b"DEL", *ks], hops) for s, ks in by_shard.items()])
        total = 0
        for p in parts:
            p = _result_to_reply(p)
            if isinstance(p, Error):
                return p
            total += p.value if isinstance(p, Raw) else p
        return total
    return node.run(go())


def _group(node: Node, keys: list[bytes]) -> dict[int, list[bytes]]:
    by_shard: dict[int, list[bytes]] = {}
    for k in keys:
        by_shard.setdefault(node.shard_of(k), []).append(k)
    return by_shard


def _multi_read(node: Node, conn: Conn, req: list[bytes], hops: int, op: str) -> Any:
    keys = req[1:]
    by_shard = _group(node, keys)

    async def go() -> Any:
        shards = list(by_shard)
        parts = await asyncio.gather(*[
            node.execute(s, (op, by_shard[s]), [req[0], *by_shard[s]], hops, read=True) for s in shards])
        results = {}
        for s, p in zip(shards, parts, strict=True):
            p = _result_to_reply(p)
            if isinstance(p, Error):
                return p
            results[s] = p.value if isinstance(p, Raw) else p
        if op == "exists":
            return sum(results.values())
        pos = {s: 0 for s in shards}
        out = []
        for k in keys:
            s = node.shard_of(k)
            out.append(results[s][pos[s]])
            pos[s] += 1
        return out
    return node.run(go())


def _cmd_mget(node: Node, conn: Conn, req: list[bytes], hops: int) -> Any:
    return _multi_read(node, conn, req, hops, "mget")


def _cmd_exists(node: Node, conn: Conn, req: list[bytes], hops: int) -> Any:
    return _multi_read(node, conn, req, hops, "exists")


def _cmd_cas(node: Node, conn: Conn, req: list[bytes], hops: int, session: tuple | None = None) -> Any:
    """CAS key expected new -> 1 if swapped, else 0.  RAFTKV.CASNX key new: swap only if absent."""
    key, expected, new = req[1], req[2], req[3]
    node._check_value(new)
    return _write(node, req, hops, node.shard_of(key), ("cas", key, expected, new), session,
                  lambda r: 1 if r[0] else 0)


def _cmd_casnx(node: Node, conn: Conn, req: list[bytes], hops: int, session: tuple | None = None) -> Any:
    key, new = req[1], req[2]
    node._check_value(new)
    return _write(node, req, hops, node.shard_of(key), ("cas", key, None, new), session,
                  lambda r: 1 if r[0] else 0)


_SESSION_WRITES: dict[bytes, Any] = {}


def _cmd_req(node: Node, conn: Conn, req: list[bytes], hops: int) -> Any:
    """RAFTKV.REQ session seq COMMAND args...: a de-duplicated write (client library)."""
    sid, seq_b, inner = req[1], req[2], req[3:]
    try:
        seq = int(seq_b)
    except ValueError:
        return Error("ERR", "RAFTKV.REQ: seq must be an integer")
    name = inner[0].upper()
    handler = _SESSION_WRITES.get(name)
    if handler is None:
        return Error("ERR", f"RAFTKV.REQ supports {', '.join(sorted(k.decode() for k in _SESSION_WRITES))}")
    arity, _ = COMMANDS[name]
    if (arity >= 0 and len(inner) != arity) or (arity < 0 and len(inner) < -arity):
        return Error("WRONGARGS", f"wrong number of arguments for '{name.decode().lower()}' command")
    return handler(node, conn, inner, hops, session=(sid, seq))


def _cmd_fwd(node: Node, conn: Conn, req: list[bytes], hops: int) -> Any:
    """RAFTKV.FWD hops COMMAND...: run a command another node forwarded; reply = its encoding."""
    try:
        hops = int(req[1])
    except ValueError:
        return Error("ERR", "RAFTKV.FWD: bad hop count")
    reply = node.dispatch(conn, req[2:], hops)

    async def wrap() -> bytes:
        return protocol.encode(await reply if asyncio.isfuture(reply) else reply)
    return node.run(wrap())


def _cmd_readonly(node: Node, conn: Conn, req: list[bytes], hops: int) -> Any:
    conn.readonly = True
    return OK


def _cmd_readwrite(node: Node, conn: Conn, req: list[bytes], hops: int) -> Any:
    conn.readonly = False
    return OK


def _cmd_status(node: Node, conn: Conn, req: list[bytes], hops: int) -> Any:
    return json.dumps(node.status()).encode()


def _cmd_transfer(node: Node, conn: Conn, req: list[bytes], hops: int) -> Any:
    """RAFTKV.TRANSFER shard [node]: hand the shard's leadership to a node (best effort)."""
    try:
        shard = int(req[1])
    except ValueError:
        return Error("ERR", "RAFTKV.TRANSFER: shard must be an integer")
    if not 0 <= shard < node.map.nshards:
        return Error("ERR", f"RAFTKV.TRANSFER: no shard {shard}")
    target = req[2].decode() if len(req) > 2 else None
    if target is not None and target not in [n.name for n in node.map.replicas(shard)]:
        return Error("ERR", f"RAFTKV.TRANSFER: {target} holds no replica of shard {shard}")
    async def transfer() -> Any:
        elsewhere = await node.leader_elsewhere(shard, req, hops)
        if elsewhere is not None:
            return elsewhere
        if target == node.name:
            return OK
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        addr = None if target is None else node.map.nodes[target].raft_addr(shard)

        def done(ok: bool, reason: str) -> None:
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(
                OK if ok else Error("TRYAGAIN", f"transfer refused ({reason}): the target must be connected "
                                                 "and fully caught up; retry")))
        node.replicas[shard].transfer_leadership(addr, done)
        return await fut
    return node.run(transfer())


def _cmd_cluster(node: Node, conn: Conn, req: list[bytes], hops: int) -> Any:
    """The cluster file (TOML, without [security]), so a client given only addresses can route."""
    return node.map.to_toml(include_secrets=False).encode()


def _cmd_shards(node: Node, conn: Conn, req: list[bytes], hops: int) -> Any:
    """Per shard: [id, leader node or nil, term] as this node believes."""
    out = []
    for s in range(node.map.nshards):
        r = node.replicas.get(s)
        if r is None:
            out.append([s, None, -1])
            continue
        addr = r.leader_addr()
        leader = None if addr is None else node.map.node_for_raft_addr(addr)
        out.append([s, None if leader is None else leader.encode(), r.raftCurrentTerm])
    return out


def _cmd_info(node: Node, conn: Conn, req: list[bytes], hops: int) -> Any:
    st = node.status()
    lines = ["# Server", "redis_version:7.0.0-raftkv", f"raftkv_node:{node.name}",
             f"process_id:{st['pid']}", f"uptime_in_seconds:{int(st['uptime_s'])}",
             "# Clients", f"connected_clients:{st['clients']}",
             "# Stats", f"total_commands_processed:{st['stats']['commands']}",
             f"forwarded_commands:{st['stats']['forwarded']}",
             "# Replication", "role:master", "# Raft"]
    for s, sh in st["shards"].items():
        lines.append(f"shard{s}:role={sh['role']},leader={sh['leader']},term={sh['term']},"
                     f"commit_idx={sh['commit_idx']},last_applied={sh['last_applied']},keys={sh['keys']}")
    lines.append("# Keyspace")
    return ("\r\n".join(lines) + "\r\n").encode()


def _cmd_ok(node: Node, conn: Conn, req: list[bytes], hops: int) -> Any:
    return OK


def _cmd_command(node: Node, conn: Conn, req: list[bytes], hops: int) -> Any:
    # redis-cli asks for COMMAND DOCS at start-up; an empty answer is valid.
    return []


def _cmd_config(node: Node, conn: Conn, req: list[bytes], hops: int) -> Any:
    # redis-benchmark reads a couple of settings; report none rather than fail.
    if len(req) >= 2 and req[1].upper() == b"GET":
        return []
    return Error("ERR", "CONFIG SET is not supported; raftkv is configured by its cluster file and flags")


def _cmd_dbsize(node: Node, conn: Conn, req: list[bytes], hops: int) -> Any:
    return sum(len(r.state) for r in node.replicas.values()) // max(1, node.map.replication)


def _cmd_quit(node: Node, conn: Conn, req: list[bytes], hops: int) -> Any:
    return OK


def _cmd_auth(node: Node, conn: Conn, req: list[bytes], hops: int) -> Any:
    """AUTH password | AUTH user password."""
    if len(req) > 3:
        return Error("WRONGARGS", "wrong number of arguments for 'auth' command")
    if not node.security.auth_required:
        return Error("ERR", "AUTH <password> called without any password configured for this node")
    user = req[1].decode(errors="replace") if len(req) == 3 else None
    if node.security.check(user, req[-1].decode(errors="replace")):
        conn.authed = True
        return OK
    return Error("WRONGPASS", "invalid username-password pair or user is disabled.")


_NO_AUTH_NEEDED = {b"AUTH", b"HELLO", b"QUIT"}
# Served by ReadIndex (or locally when stale); everything else that answers
# with a future is ordered as a write.
_READ_COMMANDS = {b"GET", b"MGET", b"EXISTS", b"RAFTKV.STALEGET"}


def _cmd_hello(node: Node, conn: Conn, req: list[bytes], hops: int) -> Any:
    """HELLO [protover [AUTH user password] [SETNAME name]]."""
    if len(req) >= 2:
        if req[1] not in (b"2", b"3"):
            return Error("NOPROTO", "unsupported protocol version; use 2 or 3")
        upper = [a.upper() for a in req]
        if b"AUTH" in upper:
            i = upper.index(b"AUTH")
            if len(req) < i + 3:
                return Error("WRONGARGS", "HELLO AUTH needs a username and a password")
            reply = _cmd_auth(node, conn, [b"AUTH", req[i + 1], req[i + 2]], hops)
            if reply is not OK:
                return reply
        elif not conn.authed:
            return Error("NOAUTH", "HELLO must be called with the client's AUTH credentials.")
        conn.resp3 = req[1] == b"3"
    return protocol.Map((b"server", b"raftkv", b"version", b"0.1.0", b"proto", 3 if conn.resp3 else 2,
                         b"id", 1, b"mode", b"standalone", b"role", b"master", b"modules", []))


# name -> (arity as in Redis: n exact, -n at least n, including the name; handler)
COMMANDS: dict[bytes, tuple[int, Any]] = {
    b"PING": (-1, _cmd_ping),
    b"ECHO": (2, _cmd_echo),
    b"GET": (2, _cmd_get),
    b"SET": (-3, _cmd_set),
    b"DEL": (-2, _cmd_del),
    b"EXISTS": (-2, _cmd_exists),
    b"MGET": (-2, _cmd_mget),
    b"CAS": (4, _cmd_cas),
    b"RAFTKV.CASNX": (3, _cmd_casnx),
    b"RAFTKV.STALEGET": (2, _cmd_staleget),
    b"RAFTKV.REQ": (-4, _cmd_req),
    b"RAFTKV.FWD": (-3, _cmd_fwd),
    b"RAFTKV.STATUS": (1, _cmd_status),
    b"RAFTKV.SHARDS": (1, _cmd_shards),
    b"RAFTKV.CLUSTER": (1, _cmd_cluster),
    b"RAFTKV.TRANSFER": (-2, _cmd_transfer),
    b"READONLY": (1, _cmd_readonly),
    b"READWRITE": (1, _cmd_readwrite),
    b"INFO": (-1, _cmd_info),
    b"COMMAND": (-1, _cmd_command),
    b"CONFIG": (-2, _cmd_config),
    b"CLIENT": (-2, _cmd_ok),
    b"SELECT": (2, _cmd_ok),
    b"DBSIZE": (1, _cmd_dbsize),
    b"QUIT": (1, _cmd_quit),
    b"HELLO": (-1, _cmd_hello),
    b"AUTH": (-2, _cmd_auth),
}
_SESSION_WRITES.update({b"SET": _cmd_set, b"DEL": _cmd_del, b"CAS": _cmd_cas, b"RAFTKV.CASNX": _cmd_casnx})
COMMANDS.update(txncmds.COMMANDS)  # MSET, RAFTKV.TXN, WATCH/MULTI/EXEC/DISCARD (cross-shard 2PC)
# -- backup/restore and membership (raftkv.backup, raftkv.membership) --
from raftkv import backup as _backup  # noqa: E402

COMMANDS.update(_backup.COMMANDS)  # RAFTKV.BACKUP
from raftkv import membership as _membership  # noqa: E402

COMMANDS.update(_membership.COMMANDS)  # RAFTKV.MEMBER, RAFTKV.MAP
# -- end backup/membership --


def setup_logging(level: str = "INFO") -> None:
    """One line per event, key=value, to stderr (the node's log file)."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="ts=%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
    )


def run_node(config: str, name: str, *, unsafe_local_reads: bool = False, log_level: str = "INFO",
             limits: Limits | None = None, metrics_port: int | None = None, insecure: bool = False) -> None:
    """Run one node in the foreground until SIGTERM/SIGINT."""
    setup_logging(log_level)
    shardmap = ShardMap.load(config)
    node = Node(shardmap, name, limits=limits, unsafe_local_reads=unsafe_local_reads, metrics_port=metrics_port,
                insecure=insecure)
    if unsafe_local_reads:
        log.warning("event=unsafe_mode node=%s msg='reads served from the local copy; NOT linearizable'", name)
    try:
        asyncio.run(node.serve())
    finally:
        node.close()
