"""Connection, introspection and operator commands: PING, HELLO, AUTH, INFO, RAFTKV.STATUS,
RAFTKV.SHARDS, RAFTKV.CLUSTER, RAFTKV.TRANSFER, RAFTKV.FAULT (fault injection), RAFTKV.HASHKV (a replica's
digest), and the few Redis
commands clients send at start-up."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from raftkv import protocol
from raftkv.acl import ACL_KEY, verify_password
from raftkv.logclock import LogClock
from raftkv.protocol import OK, PONG, Error
from raftkv.replica import ShardReplica
from raftkv.server.api import BadRequest, Command, NodeAPI, admin_access
from raftkv.server.commands.kv import to_reply
from raftkv.server.conn import Conn
from raftkv.state import hash_kv


def cmd_ping(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    return PONG if len(req) == 1 else req[1]


def cmd_echo(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    return req[1]


def cmd_readonly(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    conn.readonly = True
    return OK


def cmd_readwrite(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    conn.readonly = False
    return OK


def cmd_status(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    return json.dumps(node.status()).encode()


def parse_shard(node: NodeAPI, command: str, arg: bytes) -> int:
    """``arg`` as a shard id of this cluster; raises ``BadRequest`` saying what is wrong."""
    try:
        shard = int(arg)
    except ValueError:
        raise BadRequest(Error("ERR", f"{command}: shard must be an integer")) from None
    if shard not in node.map.groups:  # a shard being added (not on the ring yet) has a group too
        raise BadRequest(Error("ERR", f"{command}: no shard {shard}"))
    return shard


async def leader_replica(node: NodeAPI, shard: int, req: list[bytes], hops: int) -> Any:
    """This node's ``ShardReplica`` of ``shard`` once it leads; otherwise the reply of running
    ``req`` on the leader's node (or an ``Error``), which the caller returns as it is."""
    elsewhere = await node.leader_elsewhere(shard, req, hops)
    return node.replicas[shard] if elsewhere is None else elsewhere


def cmd_transfer(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    """RAFTKV.TRANSFER shard [node]: hand the shard's leadership to a node (best effort)."""
    shard = parse_shard(node, "RAFTKV.TRANSFER", req[1])
    target = req[2].decode() if len(req) > 2 else None
    if target is not None and target not in [n.name for n in node.map.replicas(shard)]:
        return Error("ERR", f"RAFTKV.TRANSFER: {target} holds no replica of shard {shard}")

    async def transfer() -> Any:
        replica = await leader_replica(node, shard, req, conn.hops)
        if not isinstance(replica, ShardReplica):
            return replica
        if target == node.name:
            return OK
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        addr = None if target is None else node.map.nodes[target].raft_addr(shard)

        def done(ok: bool, reason: str) -> None:
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(
                OK if ok else Error("TRYAGAIN", f"transfer refused ({reason}): the target must be connected "
                                                 "and fully caught up; retry")))
        replica.transfer_leadership(addr, done)
        return await fut
    return node.run(transfer())


def cmd_cluster(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    """The cluster file (TOML, without [security]), so a client given only addresses can route."""
    return node.map.to_toml(include_secrets=False).encode()


def cmd_shards(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    """Per shard: [id, leader node or nil, term] as this node believes.

    A node whose storage engine failed stopped its groups: what it last heard is stale (its own replicas
    may still say they lead), so it names no leader and clients ask another node."""
    out = []
    frozen = node.storage_failure() is not None
    for s in node.map.groups:
        r = node.replicas.get(s)
        if r is None:
            out.append([s, None, -1])
            continue
        if frozen:
            out.append([s, None, r.term()])
            continue
        addr = r.leader_addr()
        leader = None if addr is None else node.map.node_for_raft_addr(addr)
        out.append([s, None if leader is None else leader.encode(), r.term()])
    return out


def cmd_info(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
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


def cmd_ok(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    return OK


def cmd_command(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    # redis-cli asks for COMMAND DOCS at start-up; an empty answer is valid.
    return []


def cmd_config(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    # redis-benchmark reads a couple of settings; report none rather than fail.
    if len(req) >= 2 and req[1].upper() == b"GET":
        return []
    return Error("ERR", "CONFIG SET is not supported; raftkv is configured by its cluster file and flags")


def cmd_dbsize(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    """The number of live keys in the cluster: every shard's count (a linearizable read each, not
    one snapshot), less expired keys not yet deleted and the cluster's own keys."""

    async def go() -> Any:
        parts = await asyncio.gather(*(node.execute(s, ("dbsize", (ACL_KEY,)), read=True)
                                       for s in range(node.map.nshards)))
        counts = [to_reply(p) for p in parts]
        errors = [c for c in counts if isinstance(c, Error)]
        return errors[0] if errors else sum(counts)
    return node.run(go())


def cmd_auth(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    """AUTH password | AUTH user password: users of the replicated table first, then the cluster file's."""
    if len(req) > 3:
        return Error("WRONGARGS", "wrong number of arguments for 'auth' command")
    if not node.auth_required():
        return Error("ERR", "AUTH <password> called without any password configured for this node")
    user = req[1].decode(errors="replace") if len(req) == 3 else None
    password = req[-1].decode(errors="replace")
    entry = node.acl().users.get(user) if user is not None else None
    if entry is None:
        return _auth_result(node, conn, user, node.security.check(user, password))

    async def check() -> Any:
        # scrypt is deliberately slow: off the event loop
        ok = await asyncio.get_running_loop().run_in_executor(None, verify_password, password, entry.password_hash)
        return _auth_result(node, conn, user, ok)
    conn.barrier = node.run(check())  # commands pipelined behind AUTH wait for its answer
    return conn.barrier


def _auth_result(node: NodeAPI, conn: Conn, user: str | None, ok: bool) -> Any:
    if not ok:
        node.audit("auth", conn, "denied", f"user={user or 'default'}")
        return Error("WRONGPASS", "invalid username-password pair or user is disabled.")
    conn.authed = True
    conn.user = user
    return OK


def cmd_hello(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    """HELLO [protover [AUTH user password] [SETNAME name]]."""
    if len(req) >= 2:
        if req[1] not in (b"2", b"3"):
            return Error("NOPROTO", "unsupported protocol version; use 2 or 3")
        upper = [a.upper() for a in req]
        if b"AUTH" in upper:
            i = upper.index(b"AUTH")
            if len(req) < i + 3:
                return Error("WRONGARGS", "HELLO AUTH needs a username and a password")
            authed = cmd_auth(node, conn, [b"AUTH", req[i + 1], req[i + 2]])

            async def after_auth() -> Any:
                reply = await authed if asyncio.isfuture(authed) else authed
                return reply if reply is not OK else _hello(conn, req)
            return node.run(after_auth())
        if not conn.authed:
            return Error("NOAUTH", "HELLO must be called with the client's AUTH credentials.")
    return _hello(conn, req)


def _hello(conn: Conn, req: list[bytes]) -> Any:
    if len(req) >= 2:
        conn.resp3 = req[1] == b"3"
    return protocol.Map((b"server", b"raftkv", b"version", b"0.1.0", b"proto", 3 if conn.resp3 else 2,
                         b"id", 1, b"mode", b"standalone", b"role", b"master", b"modules", []))


log = logging.getLogger("raftkv.node")

CLOCK_SKEW_MS_MAX = 24 * 3600 * 1000
DISK_SLOW_MS_MAX = 60 * 1000


def _set_clock_skew(node: NodeAPI, ms: int) -> int:
    before, LogClock.skew_ms = LogClock.skew_ms, ms
    return before


def _set_clock_rate(node: NodeAPI, pct: int) -> int:
    before = round(LogClock.rate * 100)
    LogClock.set_rate(pct / 100, int(time.monotonic() * 1000))
    return before


def _set_disk_slow(node: NodeAPI, ms: int) -> int:
    before = round(node.engine.delay_s * 1000)
    node.engine.delay_s = ms / 1000
    return before


def _compact_now(node: NodeAPI, shard: int) -> int:
    """Force a checkpoint and log compaction of ``shard``'s replica (-1: every replica of the node) at its next
    tick, without waiting for followers to catch up (a follower behind the cut then needs a snapshot): what the
    fault harness's ``compaction`` nemesis kills nodes during.  Returns how many replicas were told."""
    replicas = node.replicas
    if shard != -1 and shard not in replicas:
        raise BadRequest(Error("ERR", f"RAFTKV.FAULT COMPACT.NOW: no replica of shard {shard} on this node"))
    targets = list(replicas.values()) if shard == -1 else [replicas[shard]]
    for r in targets:
        r.on_tick_thread(r.forceLogCompaction)  # a flag pysyncobj reads on the tick thread
    return len(targets)


# Faults a client may change at run time: name -> (fault point that must be armed, (min, max) ms, setter).
RUNTIME_FAULTS = {
    b"CLOCK.SKEW_MS": ("clock.skew_ms", (-CLOCK_SKEW_MS_MAX, CLOCK_SKEW_MS_MAX), _set_clock_skew),
    b"CLOCK.RATE_PCT": ("clock.skew_ms", (1, 1000), _set_clock_rate),  # percent of real time; armed with the skew
    b"DISK.SLOW_MS": ("disk.slow_ms", (0, DISK_SLOW_MS_MAX), _set_disk_slow),
    b"COMPACT.NOW": ("compact.now", (-1, 1 << 16), _compact_now),  # the value is a shard, not ms
}


def cmd_fault(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    """``RAFTKV.FAULT CLOCK.SKEW_MS ms``: set this node's clock offset for log time (``raftkv.logclock``);
    ``RAFTKV.FAULT DISK.SLOW_MS ms``: add ``ms`` to every durable commit of its storage engine (``raftkv.engine``).
    ``RAFTKV.FAULT CLOCK.RATE_PCT pct``: make that clock tick at ``pct`` % of real time from now on.
    Replies the previous value.  ``RAFTKV.FAULT COMPACT.NOW shard``: force a checkpoint and log compaction of
    the node's replica of ``shard`` (-1: all of them); replies how many replicas were told.  Each is refused
    unless the node was started with its fault point armed (``raftkv serve --fault clock.skew_ms:0`` /
    ``--fault disk.slow_ms:0`` / ``--fault compact.now:0``): a production node never lets a client move its
    log time, slow its disk or force compactions."""
    armed = {f.point for f in node.faults.armed}
    if not armed & {point for point, _, _ in RUNTIME_FAULTS.values()}:
        raise BadRequest(Error("ERR", "RAFTKV.FAULT: fault injection is off on this node (start it with "
                                      "--fault clock.skew_ms:0 to allow clock faults, --fault disk.slow_ms:0 "
                                      "for slow-disk faults, --fault compact.now:0 for forced compactions)"))
    name = req[1].upper()
    if name not in RUNTIME_FAULTS:
        raise BadRequest(Error("ERR", f"RAFTKV.FAULT: unknown fault {req[1].decode(errors='replace')!r}; "
                                      f"known: {', '.join(k.decode() for k in RUNTIME_FAULTS)}"))
    point, (lo, hi), setter = RUNTIME_FAULTS[name]
    label = name.decode()
    if point not in armed:
        raise BadRequest(Error("ERR", f"RAFTKV.FAULT {label}: not armed on this node (start it with "
                                      f"--fault {point}:0)"))
    try:
        ms = int(req[2])
    except ValueError:
        raise BadRequest(Error("ERR", f"RAFTKV.FAULT {label}: want an integer (milliseconds; a shard for COMPACT.NOW)")) from None
    if not lo <= ms <= hi:
        unit = "%" if label == "CLOCK.RATE_PCT" else " ms"
        raise BadRequest(Error("ERR", f"RAFTKV.FAULT {label}: {ms}{unit} is beyond {lo}..{hi}{unit}"))
    before = setter(node, ms)
    log.warning("event=fault node=%s fault=%s point=%s value=%d previous=%d", node.name, label, point, ms, before)
    return before


def cmd_hashkv(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    """RAFTKV.HASHKV shard: ``[revision, digest]`` of THIS node's replica of the shard (``raftkv.state.hash_kv``).

    Answered by the local replica, leader or not, so an operator (or the fault harness's replicas check) can
    compare every replica of a shard at the same revision: equal digests, or the replicas diverged."""
    shard = parse_shard(node, "RAFTKV.HASHKV", req[1])
    replica = node.replicas.get(shard)
    if replica is None:
        return Error("ERR", f"RAFTKV.HASHKV: {node.name} holds no replica of shard {shard}")

    async def digest() -> Any:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def take() -> None:  # on the tick thread, between two applied entries
            st = replica.state
            out = (st.revision, st.data.view())
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(out))

        replica.on_tick_thread(take)
        try:
            revision, view = await asyncio.wait_for(fut, node.timing.request_timeout_s)
        except TimeoutError:
            return Error("TRYAGAIN", f"RAFTKV.HASHKV: shard {shard}'s replica on {node.name} did not answer "
                                     "(its Raft driver is busy or stopped); retry")
        return [revision, (await loop.run_in_executor(None, hash_kv, revision, view.items())).encode()]

    return node.run(digest())


COMMANDS: dict[bytes, Command] = {
    b"PING": Command(-1, cmd_ping),
    b"ECHO": Command(2, cmd_echo),
    b"RAFTKV.STATUS": Command(1, cmd_status),
    b"RAFTKV.SHARDS": Command(1, cmd_shards),
    b"RAFTKV.CLUSTER": Command(1, cmd_cluster),
    b"RAFTKV.TRANSFER": Command(-2, cmd_transfer, leader_only=True, access=admin_access),
    b"RAFTKV.FAULT": Command(3, cmd_fault, access=admin_access),
    b"RAFTKV.HASHKV": Command(2, cmd_hashkv, access=admin_access),
    b"READONLY": Command(1, cmd_readonly),
    b"READWRITE": Command(1, cmd_readwrite),
    b"INFO": Command(-1, cmd_info),
    b"COMMAND": Command(-1, cmd_command),
    b"CONFIG": Command(-2, cmd_config),
    b"CLIENT": Command(-2, cmd_ok),
    b"SELECT": Command(2, cmd_ok),
    b"DBSIZE": Command(1, cmd_dbsize, read=True),
    b"QUIT": Command(1, cmd_ok, no_auth=True),
    b"HELLO": Command(-1, cmd_hello, no_auth=True),
    b"AUTH": Command(-2, cmd_auth, no_auth=True),
}
