"""A raftkv node process: hosts shard replicas and serves clients over RESP.

Theory of operation
-------------------
A node hosts one ``ShardReplica`` per shard placed on it and one client port.
Every replica is a Raft group member driven by the node's one Raft driver thread
(``raftkv.driver``) over the node's one Raft port (``raftkv.raftnet``: one
connection per peer node carries every group's messages).
The request path, one module per step:

``conn``        bytes -> requests (limits checked at each header) -> replies in order
``commands``    one table: a request -> the state-machine commands it needs
``router``      a command -> its shard's leader: proposed here, or sent to the
                leader's node over the internal RPC (``rpc``, ``peer``); the
                answer accounts for every attempt (applied / not applied / unknown)
``batch``       on the leader, a turn's commands -> one Raft entry (writes) or
                one ReadIndex round (linearizable reads, no log entry)

Stale reads (``READONLY`` connections, ``RAFTKV.STALEGET``) read the local
replica and say so by being asked for explicitly.  Cross-shard transactions are
coordinated by ``raftkv.server.coordinator`` on the home shard's leader.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import signal
import time
from collections.abc import Coroutine
from typing import Any

from raftkv.acl import ACL_KEY, RESERVED_PREFIX, AclError, AclTable, Permissions
from raftkv.driver import RaftDriver
from raftkv.engine import DEFAULT_MAP_SIZE, ENGINE_DIR, Engine
from raftkv.heap import HeapFreezer
from raftkv.logclock import LogClock
from raftkv.protocol import Error
from raftkv.raftfix import tuned_conf
from raftkv.raftnet import RaftNetwork
from raftkv.reclaim import Reclaimer
from raftkv.replica import ShardReplica
from raftkv.security import Security, check_bind
from raftkv.server import commands
from raftkv.server.api import BadRequest, Command, Faults, Limits, Timing, admin_access
from raftkv.server.balancer import balance_loop
from raftkv.server.commands.leases import sweep_loop as lease_sweep_loop
from raftkv.server.commands.member import map_poll_loop
from raftkv.server.conn import Conn, serve_connection
from raftkv.server.coordinator import TxnService
from raftkv.server.feed import AppliedWaiters
from raftkv.server.metrics import NodeMetrics, disk_free_ratio, serve_http, txn_summary
from raftkv.server.router import Router
from raftkv.state import STATE_MACHINE_VERSION
from shards.shardmap import ShardMap

log = logging.getLogger("raftkv.node")

#: Commit the engine on a committer thread while the driver goes on (``Engine.start_committer``), instead of
#: on the driver thread at the end of each loop. Off: on the shared 2-vCPU machine it was measured (docs/engine.md)
#: to lower a whole node's put throughput at 6 shards (0.6x of the synchronous commit), though the write path
#: alone gained from it; every durability rule holds either way (raftfix's gate releases what a commit covers).
PIPELINED_COMMITS = False
REAP_PERIOD_S = 0.25  # how often a leader checks for expired keys no entry has deleted yet
audit_log = logging.getLogger("raftkv.audit")


class Node:
    """A node: replicas of its shards plus the RESP server (implements ``NodeAPI``)."""

    def __init__(self, shardmap: ShardMap, name: str, limits: Limits | None = None,
                 timing: Timing | None = None, unsafe_local_reads: bool = False,
                 raft_overrides: dict | None = None, metrics_port: int | None = None,
                 security: Security | None = None, insecure: bool = False, faults: Faults | None = None,
                 compact_every_cmds: int | None = None, engine_map_size: int = DEFAULT_MAP_SIZE,
                 unsafe_no_sync: bool = False, unsafe_skip_locks: bool = False,
                 unsafe_watch_miss: bool = False, engine_kind: str | None = None) -> None:
        if name not in shardmap.nodes:
            raise ValueError(f"node {name!r} is not in the cluster file (nodes: {', '.join(shardmap.nodes)})")
        self.map = shardmap
        self.name = name
        self.info = shardmap.nodes[name]
        self.limits = limits or Limits()
        self.timing = timing or Timing()
        self.faults = faults or Faults()
        # Deliberately unsafe mode for the fault harness: serve reads from the
        # local copy without proving leadership.  Never use it for real data.
        self.unsafe_local_reads = unsafe_local_reads
        # Two more deliberately broken modes, negative controls for the harness (never for real data):
        # one-shard writes ignore transactions' locks (every node of the cluster must have the same
        # setting: it changes what the state machine does), and EXEC misses writes to watched keys.
        self.unsafe_skip_locks = unsafe_skip_locks
        self.unsafe_watch_miss = unsafe_watch_miss
        self.security = security or Security.from_config(shardmap.security)
        check_bind([self.info.host], self.security, insecure)
        # One Raft port, one connection per peer node and one thread for every shard group (raftkv.driver).
        timers = tuned_conf(**(raft_overrides or {}))
        self.election_timeout_ms = [round(timers.raftMinTimeout * 1000), round(timers.raftMaxTimeout * 1000)]
        self.network = RaftNetwork(self.info.host, self.info.raft_port, cluster=shardmap.name,
                                   key=self.security.raft_key(shardmap.name),
                                   encrypt=self.security.raft_key_is_secret,
                                   timeout_s=timers.connectionTimeout)
        # flush_threads=0: the groups share one storage engine, whose first flush in a loop covers them all.
        self.driver = RaftDriver(self.network, period_s=timers.autoTickPeriod, name=f"raft-{name}", flush_threads=0)
        self.heap = HeapFreezer()
        self._replicas: dict[int, ShardReplica] = {}
        self.feed = AppliedWaiters()
        data_dir = shardmap.node_data_dir(name)
        # One storage engine for every group on this node: one durable commit covers all their log writes.
        # unsafe_no_sync: a deliberately broken mode for the fault harness (acknowledges writes that a power loss
        # undoes); never for real data.
        self.engine = Engine(os.path.join(data_dir, ENGINE_DIR), map_size=engine_map_size, sync=not unsafe_no_sync,
                             kind=engine_kind)
        if PIPELINED_COMMITS:
            # The driver requests each loop's commit and goes on; the committer thread wakes it when the commit
            # is durable (raftkv.driver, docs/engine.md).
            self.engine.start_committer(self.driver.on_durable)
        self._raft_overrides = raft_overrides
        self._compact_every_cmds = compact_every_cmds
        self.leader_changes: dict[int, collections.deque[float]] = {}
        self.metrics = NodeMetrics(self)
        self.router = Router(self)
        # The engine data of groups this node stopped hosting is deleted in chunks on the driver thread; a reclaim
        # cut short by a crash resumes here (raftkv.reclaim).
        self.reclaimer = Reclaimer(self.engine, self._group_dir)
        self.driver.add_chore(lambda: self.reclaimer.step(self.driver.groups))
        # A shard the ring lost while this node was down (`raftkv shard remove`: its keys moved to the others
        # and no map has a group for it any more): its data is reclaimed as a moved-away replica's would be, so
        # a later `shard add` of that id never starts from it.
        for group in self.reclaimer.leftover(range(len(shardmap.groups)), cap=1):
            log.info("event=removed_shard_reclaim group=%d", group)
            self.reclaimer.mark(group)
        for shard in shardmap.shards_on(name):
            self._start_replica(shard)
        self.driver.start()
        self.clients = 0
        self.started = time.time()
        self.stats = {"commands": 0, "errors": 0}
        self.txns = TxnService(self)
        self.metrics_port = metrics_port if metrics_port is not None else self.info.metrics_port
        self._tasks: list[asyncio.Task] = []
        self._acl = AclTable()
        self._acl_blob: bytes | None = None
        self._acl_fetched: bytes | None = None  # the table, when this node hosts no replica of its shard
        self._acl_perms: dict[str, Permissions | None] = {}

    @property
    def replicas(self) -> dict[int, ShardReplica]:
        return self._replicas

    def _group_dir(self, shard: int) -> str:
        return os.path.join(self.map.node_data_dir(self.name), f"shard-{shard}")

    def _start_replica(self, shard: int) -> None:
        """Build this node's member of ``shard``'s group (peers: the map's other replicas) and tick it.

        A member this node hosted before and stopped starts clean, as a new member: whatever of its old data is
        still being reclaimed is deleted first (it never starts from those leftovers), and so is data of an
        earlier group of the same shard id (``ShardMap.born``: the shard was removed and added again while this
        node was down or cut off).
        """
        t0 = time.perf_counter()
        pending = shard in self.reclaimer.pending()
        incarnation = self.map.incarnation(shard)
        if self.reclaimer.adopt(shard, incarnation) or pending:
            log.info("event=reclaim_finished_before_start shard=%d ms=%.1f", shard, (time.perf_counter() - t0) * 1000)
        peers = [n.raft_addr(shard) for n in self.map.replicas(shard) if n.name != self.name]
        replica = ShardReplica(
            shard, self.info.raft_addr(shard), peers, self._group_dir(shard),
            on_role_change=self._role_changed, conf_overrides=self._raft_overrides,
            compact_every_cmds=self._compact_every_cmds, engine=self.engine, on_applied=self.feed.applied,
            driver=self.driver, unsafe_skip_locks=self.unsafe_skip_locks, incarnation=incarnation)
        self._replicas[shard] = replica
        self.leader_changes.setdefault(shard, collections.deque(maxlen=64))
        self.metrics.leader_changes.labels(str(shard))  # export 0 before the first change
        self.router.adopt(shard, replica)
        self.driver.add(replica)

    def _stop_replica(self, shard: int) -> None:
        """Stop and destroy this node's member of ``shard``'s group (it was removed from the group), and have
        everything it stored in the node's engine deleted (``raftkv.reclaim``).

        The mark comes first, durably: from then on a restart neither loads the group nor forgets to finish
        deleting it. The deletion itself runs in chunks on the driver thread once the group is gone from it.
        """
        self.reclaimer.mark(shard)
        replica = self._replicas.pop(shard)
        self.router.drop(shard)
        replica.destroy()  # on the driver thread; waits for one driver iteration

    def storage_failure(self) -> str | None:
        return self.driver.failure

    def _role_changed(self, shard: int, old: int, new: int) -> None:
        # Runs on the shard's tick thread: only thread-safe work here (deque.append is atomic).
        if new == 2 or old == 2:
            self.metrics.leader_changes.labels(str(shard)).inc()
            self.leader_changes[shard].append(time.monotonic())

    # -- serving -------------------------------------------------------------------------------
    async def serve(self, ready: asyncio.Event | None = None) -> None:
        """Serve until SIGTERM/SIGINT."""
        loop = asyncio.get_running_loop()
        self.heap.install()
        if self.timing.gc_freeze_period_s > 0:
            self._tasks.append(asyncio.create_task(self.heap.run(self.timing.gc_freeze_period_s)))
        self.router.start(loop)
        self.feed.start(loop)
        if self.metrics_port:
            await serve_http(self, self.metrics, self.info.host, self.metrics_port)
            log.info("event=metrics node=%s addr=http://%s:%d/metrics", self.name, self.info.host,
                     self.metrics_port)
        self._tasks.append(asyncio.create_task(self.txns.recovery_loop()))
        self._tasks.append(asyncio.create_task(self._reap_loop()))
        self._tasks.append(asyncio.create_task(lease_sweep_loop(self)))
        self._tasks.append(asyncio.create_task(self._fetch_acl_loop()))
        self._tasks.append(asyncio.create_task(map_poll_loop(self)))
        if self.timing.balance_period_s > 0:
            self._tasks.append(asyncio.create_task(balance_loop(self, self.timing.balance_period_s)))
            log.info("event=leader_balancer node=%s period_s=%g", self.name, self.timing.balance_period_s)
        server = await asyncio.start_server(lambda r, w: serve_connection(self, r, w), self.info.host,
                                            self.info.client_port, limit=1 << 20, backlog=1024,
                                            ssl=self.security.server_ssl())
        log.info("event=serving node=%s addr=%s:%d shards=%s epoch=%d", self.name, self.info.host,
                 self.info.client_port, sorted(self._replicas), self.map.epoch)
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

    async def _reap_loop(self) -> None:
        """Reclaim expired keys through the log: when a leader's earliest deadline has passed and no
        entry came to delete it, propose an empty one (``raftkv.expiry``; replicas never delete on
        their own clocks)."""
        while True:
            await asyncio.sleep(REAP_PERIOD_S)
            for shard, replica in list(self._replicas.items()):  # groups come and go (install_map)
                due = min((t for t in (replica.state.expiries.earliest(), replica.state.leases.earliest())
                           if t is not None), default=None)  # a key's deadline or a lease's (raftkv.leases)
                if due is not None and replica.is_leader() and due <= replica.log_now_ms():
                    await self.execute(shard, ("noop",))

    async def _fetch_acl_loop(self) -> None:
        """Keep a copy of the user/role table when its shard lives on other nodes."""
        shard = self.map.shard_for_key(ACL_KEY)
        while True:
            if shard not in self._replicas:  # checked each time: a rebalance moves replicas on and off
                res = await self.execute(shard, ("get", ACL_KEY), read=True)
                if res is None or isinstance(res, bytes):
                    self._acl_fetched = res
            await asyncio.sleep(1.0)

    def close(self) -> None:
        self.heap.uninstall()
        self.driver.stop()
        for r in self._replicas.values():
            r.destroy()  # the driver has stopped: destroyed here
        self.engine.close()  # stops the committer (whose on_commit wakes the driver) before the driver closes
        self.driver.close()
        self.network.close()

    # -- dispatch --------------------------------------------------------------------------------
    def dispatch(self, conn: Conn, req: list[bytes]) -> Any:
        """Reply value, or a future of one.  Futures start now, so order is kept."""
        self.stats["commands"] += 1
        name = req[0].upper()
        spec = commands.COMMANDS.get(name)
        if conn.txn is not None and conn.txn.queuing and name not in commands.MULTI_CONTROL:
            # Inside MULTI (which needed auth): queue for EXEC; unknown commands abort EXEC.
            refused = self._refused(conn, spec, req)
            if refused is not None:
                conn.txn.dirty = refused.message
                return refused
            return commands.queue_in_multi(self, conn, req, name)
        if spec is None:
            return Error("ERR", f"unknown command '{req[0].decode(errors='replace')}'")
        n = len(req)
        if (spec.arity >= 0 and n != spec.arity) or (spec.arity < 0 and n < -spec.arity):
            return Error("WRONGARGS", f"wrong number of arguments for '{name.decode().lower()}' command")
        if not conn.authed and not spec.no_auth:
            return Error("NOAUTH", "Authentication required.")
        if spec.internal and conn.node is None:
            self.audit(name.decode(errors="replace").lower(), conn, "denied", "internal command from a client")
            return Error("NOPERM", f"{name.decode(errors='replace')} is an internal command: only nodes of this "
                                   "cluster may send it")
        refused = self._refused(conn, spec, req)
        if refused is not None:
            return refused
        if spec.access is admin_access:
            self.audit(name.decode(errors="replace").lower(), conn, "allowed")
        try:
            return spec.handler(self, conn, req)
        except BadRequest as e:
            return e.error

    def _refused(self, conn: Conn, spec: Command | None, req: list[bytes]) -> Error | None:
        """-NOPERM when the connection's user may not run ``req`` (every key is checked first)."""
        if conn.user is None or spec is None or spec.access is None:
            return None
        perms = self.permissions(conn.user)
        if perms is None:  # a user of the cluster file: every right, as before roles existed
            return None
        why = perms.check(spec.access(req))
        if why is None:
            return None
        action = req[0].decode(errors="replace").lower()
        if spec.access is admin_access:
            self.audit(action, conn, "denied", why)
        return Error("NOPERM", f"user {conn.user!r}: {why} ({action})")

    # -- users and roles ---------------------------------------------------------------------------
    def acl(self) -> AclTable:
        """The replicated user/role table as this node last applied it (a local, possibly stale read)."""
        replica = self._replicas.get(self.map.shard_for_key(ACL_KEY))
        blob = self._acl_fetched if replica is None else (replica.state.peek(ACL_KEY) or (None,))[0]
        # Compared by value: the store hands out a new bytes object per read, and this runs per command.
        if blob != self._acl_blob:
            try:
                self._acl = AclTable.decode(blob)
            except (AclError, ValueError) as e:
                log.error("event=acl_table_unreadable err=%s", e)
            self._acl_blob, self._acl_perms = blob, {}
        return self._acl

    def permissions(self, user: str) -> Permissions | None:
        table = self.acl()
        if user not in self._acl_perms:
            self._acl_perms[user] = table.permissions(user)
        return self._acl_perms[user]

    def auth_required(self) -> bool:
        return self.security.auth_required or bool(self.acl().users)

    def dispatch_ordered(self, conn: Conn, req: list[bytes]) -> Any:
        """``dispatch``, but after an AUTH in progress, and reads after this connection's earlier writes."""
        barrier = conn.barrier
        if barrier is not None and not barrier.done():
            return self.run(self._after(barrier, self.dispatch_ordered, conn, req))
        spec = commands.COMMANDS.get(req[0].upper())
        pending = conn.last_write
        if spec is not None and spec.read:
            if pending is not None and not pending.done():
                return self.run(self._after(pending, self.dispatch, conn, req))
            return self.dispatch(conn, req)
        reply = self.dispatch(conn, req)
        if asyncio.isfuture(reply):
            conn.last_write = reply
        return reply

    @staticmethod
    async def _after(first: asyncio.Future, dispatch: Any, conn: Conn, req: list[bytes]) -> Any:
        await asyncio.wait([first])
        reply = dispatch(conn, req)
        return await reply if asyncio.isfuture(reply) else reply

    def audit(self, action: str, conn: Conn, outcome: str, detail: str = "") -> None:
        """One structured line (and a metric) per administrative action or refused identity."""
        self.metrics.audit.labels(action, outcome).inc()
        audit_log.info("event=audit action=%s user=%s node=%s peer=%s outcome=%s%s", action,
                       conn.user or ("-" if conn.node else "default"), conn.node or "-", conn.peer, outcome,
                       f" detail={detail!r}" if detail else "")

    def count_reply(self, reply: Any, name: bytes | None, started: float) -> None:
        """Account one reply in the stats and metrics."""
        if isinstance(reply, Error):
            self.stats["errors"] += 1
            self.metrics.errors.labels(reply.code).inc()
        if name is not None:
            upper = name.upper()
            cmd = upper if upper in commands.COMMANDS else b"unknown"
            self.metrics.requests.labels(cmd.decode(errors="replace").lower()).observe(time.perf_counter() - started)

    # -- NodeAPI ---------------------------------------------------------------------------------
    def shard_of(self, key: bytes) -> int:
        if key.startswith(RESERVED_PREFIX):
            raise BadRequest(Error("NOPERM", f"keys starting with {RESERVED_PREFIX!r} are reserved for the cluster "
                                             "(users and roles live there)"))
        if len(key) > self.limits.key_bytes_max:
            raise BadRequest(Error("TOOBIG", f"key of {len(key)} bytes exceeds key_bytes_max="
                                             f"{self.limits.key_bytes_max}"))
        return self.map.shard_for_key(key)

    def check_value(self, value: bytes) -> None:
        if len(value) > self.limits.value_bytes_max:
            raise BadRequest(Error("TOOBIG", f"value of {len(value)} bytes exceeds value_bytes_max="
                                             f"{self.limits.value_bytes_max}"))

    def run(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Future:
        return asyncio.ensure_future(coro)

    async def execute(self, shard: int, cmd: tuple, *, read: bool = False, idempotent: bool = False,
                      hops: int = 0, budget_s: float | None = None) -> Any:
        return await self.router.execute(shard, cmd, read=read, idempotent=idempotent, hops=hops,
                                         budget_s=budget_s)

    def leader_node(self, shard: int) -> str | None:
        return self.router.leader_node(shard)

    async def rpc(self, target: str, message: tuple, timeout: float) -> Any:
        return await self.router.link(target).rpc(message, timeout)

    async def wait_applied(self, revisions: dict[int, int], timeout: float) -> None:
        await self.feed.wait(revisions, self._replicas, timeout)

    async def stale_read(self, shard: int, cmd: tuple) -> Any:
        return await self.router.stale_read(shard, cmd)

    async def leader_elsewhere(self, shard: int, req: list[bytes], hops: int) -> Any:
        return await self.router.leader_elsewhere(shard, req, hops)

    async def coordinate_at_home(self, txid: str, compares: Any, then_ops: Any, else_ops: Any,
                                 hops: int = 0, ring: str | None = None) -> Any:
        return await self.txns.coordinate(txid, compares, then_ops, else_ops, hops, ring)

    async def run_forwarded(self, req: list[bytes], hops: int, peer: str) -> Any:
        spec = commands.COMMANDS.get(req[0].upper())
        if spec is None or not spec.leader_only:
            return Error("ERR", f"RAFTKV.RPC: {req[0]!r} is not a command run on a shard's leader")
        try:
            reply = spec.handler(self, Conn(peer, authed=True, hops=hops), req)
        except BadRequest as e:
            return e.error
        return await reply if asyncio.isfuture(reply) else reply

    def install_map(self, new: ShardMap) -> None:
        if self.map.security:  # keep this node's own secrets; maps are pushed without them
            new = dataclasses.replace(new, security=self.map.security)
        self.map = new
        self.info = new.nodes[self.name]
        # The map's placement says which groups this node is a member of: a rebalance adds this node to a
        # group (RAFTKV.MEMBER ADD on its leader) before pushing the map that places the shard here, and
        # removes it from the group before pushing the map that no longer does.
        want = set(new.shards_on(self.name))
        # A group of an earlier incarnation of a shard id that this node still runs (it missed the maps that
        # removed the shard and added it again): stopped and reclaimed, and the new group started from nothing.
        renewed = sorted(s for s in want & set(self._replicas) if self._replicas[s].incarnation != new.incarnation(s))
        for shard in renewed:
            log.warning("event=group_renewed node=%s shard=%d incarnation=%d was=%d", self.name, shard,
                        new.incarnation(shard), self._replicas[shard].incarnation)
            self._stop_replica(shard)
        started = sorted(want - set(self._replicas))
        stopped = sorted(set(self._replicas) - want)
        for shard in started:
            self._start_replica(shard)
        for shard in stopped:
            self._stop_replica(shard)
        log.info("event=map_installed node=%s epoch=%d started=%s stopped=%s groups=%d", self.name, new.epoch,
                 started, stopped, len(new.groups))

    def status(self) -> dict:
        shards = {}
        for s, r in sorted(self._replicas.items()):
            st = r.status()
            leader = r.leader_addr()
            open_txns, oldest_txn = txn_summary(r.state.txns, r.log_now_ms())
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
                "leases": len(r.state.leases.leases),  # homed here, and mirrors (raftkv.leases)
                "lease_drops_pending": len(r.state.leases.dropping),
                "oldest_txn_age_s": oldest_txn,
                "ticking": r.tick_thread_alive(),
                # since this process started: checkpoints (each one a log compaction), snapshots sent to
                # followers and installed from a leader (the compaction nemesis reads them)
                "checkpoints": r.snapshots.stats["checkpoints"],
                "snapshots_sent": r.snapshots.stats["sent"],
                "snapshots_installed": r.snapshots.stats["installs"],
                # raftkv shard add|remove (raftkv.reshard): the move under way here (dest: the shard added,
                # or removed when "removing"), and the ring this shard serves under since its last move (null on
                # a shard that never took part in one)
                "move": None if r.state.move is None else {"epoch": r.state.move.epoch, "dest": r.state.move.dest,
                                                           "phase": r.state.move.phase,
                                                           **({"removing": True} if r.state.move.removing else {})},
                "ring_shards": None if r.state.owner is None else r.state.owner.nshards,
            }
        return {"node": self.name, "epoch": self.map.epoch, "pid": os.getpid(), **self._version_status(),
                "disk_free_ratio": round(disk_free_ratio(self.map.node_data_dir(self.name)), 4),
                "uptime_s": round(time.time() - self.started, 1), "clients": self.clients,
                "stats": {**self.stats, "forwarded": self.router.forwarded}, "shards": shards,
                "raft": {**self.network.status(), "driver_alive": self.driver.alive(),
                         "election_timeout_ms": self.election_timeout_ms,
                         "driver_failure": self.driver.failure, **dict(self.driver.stats)},
                "engine": self._engine_status(), "heap": self.heap.stats()}

    def _version_status(self) -> dict:
        """``state_machine_version`` (``raftkv.state``): what ``raftkv shard add|remove`` compares across nodes."""
        fault = self.faults.fire("status.state_machine_version", "")
        if fault is None:
            return {"state_machine_version": STATE_MACHINE_VERSION}
        return {} if fault.value < 0 else {"state_machine_version": int(fault.value)}

    def _engine_status(self) -> dict:
        st = self.engine.stats()
        rc = self.reclaimer.stats()
        return {"commits": st.count, "commit_s": round(st.total_s, 6), "commit_max_ms": round(st.max_s * 1000, 3),
                "injected_delay_ms": round(self.engine.delay_s * 1000, 3),
                "kind": self.engine.kind,
                "fsync": self.engine.synced,  # False: the unsafe no-sync mode (a negative control)
                **self.engine.usage(),
                # groups no longer hosted here: deleted since this process started, still being deleted, and
                # the keys the engine still holds of groups it does not host (per group, counted up to 10,000)
                "reclaim": {"groups": rc.groups, "keys": rc.keys, "bytes": rc.bytes, "chunks": rc.chunks,
                            "pending": self.reclaimer.pending(), "failure": self.reclaimer.failure},
                "unhosted_keys": {str(g): n for g, n in sorted(self.reclaimer.leftover(set(self._replicas)).items())}}


def setup_logging(level: str = "INFO") -> None:
    """One line per event, key=value, to stderr (the node's log file)."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="ts=%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
    )


def run_node(config: str, name: str, *, unsafe_local_reads: bool = False, log_level: str = "INFO",
             limits: Limits | None = None, timing: Timing | None = None, metrics_port: int | None = None,
             insecure: bool = False, faults: Faults | None = None, compact_every_cmds: int | None = None,
             engine_map_size: int = DEFAULT_MAP_SIZE, raft_overrides: dict | None = None,
             unsafe_no_sync: bool = False, unsafe_skip_locks: bool = False,
             unsafe_watch_miss: bool = False, engine_kind: str | None = None) -> None:
    """Run one node in the foreground until SIGTERM/SIGINT (``raft_overrides``: ``SyncObjConf`` timers)."""
    setup_logging(log_level)
    shardmap = ShardMap.load(config)
    node = Node(shardmap, name, limits=limits, timing=timing, unsafe_local_reads=unsafe_local_reads,
                metrics_port=metrics_port, insecure=insecure, faults=faults, compact_every_cmds=compact_every_cmds,
                engine_map_size=engine_map_size, raft_overrides=raft_overrides, unsafe_no_sync=unsafe_no_sync,
                unsafe_skip_locks=unsafe_skip_locks, unsafe_watch_miss=unsafe_watch_miss, engine_kind=engine_kind)
    if unsafe_local_reads:
        log.warning("event=unsafe_mode node=%s msg='reads served from the local copy; NOT linearizable'", name)
    if unsafe_no_sync:
        log.warning("event=unsafe_mode node=%s msg='storage engine never fsyncs: a power loss loses acknowledged "
                    "writes'", name)
    if unsafe_skip_locks:
        log.warning("event=unsafe_mode node=%s msg='one-shard writes ignore transaction locks; NOT serializable, "
                    "testing only'", name)
    if unsafe_watch_miss:
        log.warning("event=unsafe_mode node=%s msg='EXEC misses writes to watched keys; lost updates, testing "
                    "only'", name)
    if not node.security.node_identity_is_secret:
        log.warning("event=insecure_node_identity node=%s msg='no [security] node_key or secret in the cluster "
                    "file: node identity is not secret, so clients can forge internal commands'", name)
    if node.faults.armed:
        log.warning("event=faults_armed node=%s faults=%s", name,
                    ",".join(f"{f.point}:{f.value:g}:{f.count}:{f.match}" for f in node.faults.armed))
        skew = node.faults.fire("clock.skew_ms", "")
        if skew is not None:
            LogClock.skew_ms = int(skew.value)
        slow = node.faults.fire("disk.slow_ms", "")
        if slow is not None:
            node.engine.delay_s = slow.value / 1000
    try:
        asyncio.run(node.serve())
    finally:
        node.close()
