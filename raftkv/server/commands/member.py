"""``RAFTKV.MEMBER`` and ``RAFTKV.MAP``: the node side of membership changes (see ``raftkv.membership``)."""

from __future__ import annotations

import asyncio
import logging
import tomllib
from typing import Any

from raftkv.protocol import OK, Error
from raftkv.replica import ShardReplica
from raftkv.server.api import Command, NodeAPI, admin_access
from raftkv.server.commands.admin import leader_replica, parse_shard
from raftkv.server.conn import Conn
from shards.shardmap import ShardMap, ShardMapError

log = logging.getLogger("raftkv.membership")


def cmd_member(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    """RAFTKV.MEMBER shard ADD|REMOVE host:raft_port | RAFTKV.MEMBER shard LIST."""
    shard = parse_shard(node, "RAFTKV.MEMBER", req[1])
    action = req[2].upper()
    if action not in (b"ADD", b"REMOVE", b"LIST") or (action == b"LIST") != (len(req) == 3):
        return Error("ERR", "usage: RAFTKV.MEMBER shard ADD|REMOVE host:raft_port | RAFTKV.MEMBER shard LIST")
    return node.run(_member(node, shard, action, req[3].decode() if len(req) > 3 else "", req, conn.hops))


async def _member(node: NodeAPI, shard: int, action: bytes, addr: str, req: list[bytes], hops: int) -> Any:
    replica = await leader_replica(node, shard, req, hops)
    if not isinstance(replica, ShardReplica):
        return replica
    loop = asyncio.get_running_loop()
    deadline = loop.time() + node.timing.request_timeout_s
    fut = loop.create_future()

    def answer(value: Any) -> None:
        loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(value))

    def action_on_tick() -> None:  # on the Raft tick thread
        # Answer "already done" only from the committed configuration: a change still
        # uncommitted may be truncated away.  Re-sending it is safe: the leader answers an
        # identical pending change when it commits (raftfix: one change at a time).
        members = replica.applied_member_addrs()
        if action == b"LIST":
            answer(sorted(m.encode() for m in members))
            return
        if action == b"ADD" and addr in members:
            answer(OK)
            return
        if action == b"REMOVE" and addr not in members:
            answer(OK)
            return
        if action == b"REMOVE" and addr == replica.self_addr():
            # A leader cannot remove itself: hand over to the most caught-up member, then retry.
            replica.transfer_leadership(None, lambda ok, why: None)
            answer(Error("TRYAGAIN", f"shard {shard}: the leader is the node being removed; leadership is "
                                     "moving, retry"))
            return

        def done(ok: bool, reason: str) -> None:
            if ok:
                answer(OK)
            else:
                answer(Error("TRYAGAIN", f"shard {shard}: membership change not applied ({reason}: another "
                                         "change may be in progress, or the leader changed); retry"))

        log.info("event=membership_change shard=%d action=%s node=%s", shard, action.decode().lower(), addr)
        replica.change_members("add" if action == b"ADD" else "remove", addr, done)

    replica.on_tick_thread(action_on_tick)
    try:
        return await asyncio.wait_for(fut, max(0.1, deadline - loop.time()))
    except TimeoutError:
        return Error("UNKNOWN", f"shard {shard}: membership change not confirmed in time; run it again "
                                "(it is idempotent)")


def shrink_allowed(old: ShardMap, new: ShardMap) -> bool:
    """May a node holding ``old`` install ``new`` with fewer shards?  Only one less, the one ``old`` marks
    as being removed (``raftkv shard remove`` moved its keys before writing ``new``)."""
    return old.removing is not None and new.nshards == old.nshards - 1 == old.removing and new.epoch > old.epoch


def cmd_map(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    """RAFTKV.MAP toml: install a newer shard map (routing, status); answers the node's epoch."""
    try:
        new = ShardMap.from_dict(tomllib.loads(req[1].decode()), source="RAFTKV.MAP")
    except (ShardMapError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        return Error("ERR", f"RAFTKV.MAP: {e}")
    # The shard count changes only through `raftkv shard add|remove` (raftkv.reshard): an add pushes the map
    # that places the new shard's group, then the one whose ring includes it; a removal pushes the map that
    # marks the last shard as being removed, then (its keys moved) the one without it. So a map with fewer
    # shards is taken only from a map marking the removal of exactly the shard it drops.
    if new.vnodes != node.map.vnodes:
        return Error("ERR", "RAFTKV.MAP: vnodes cannot change")
    if new.nshards < node.map.nshards and not shrink_allowed(node.map, new):
        return Error("ERR", f"RAFTKV.MAP: the shard count cannot shrink ({node.map.nshards} -> {new.nshards}) "
                            "unless this node's map marks the removal of that shard ('raftkv shard remove' "
                            "pushes that map first; run it again)")
    if node.name not in new.nodes:
        return Error("ERR", f"RAFTKV.MAP: this node ({node.name}) is not in the new map")
    if new.epoch > node.map.epoch:
        node.install_map(new)
    return node.map.epoch


COMMANDS: dict[bytes, Command] = {
    b"RAFTKV.MEMBER": Command(-3, cmd_member, leader_only=True, access=admin_access),
    b"RAFTKV.MAP": Command(2, cmd_map, access=admin_access),
}


