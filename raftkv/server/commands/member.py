"""``RAFTKV.MEMBER``, ``RAFTKV.MAP``, ``RAFTKV.MAPCAS`` and ``RAFTKV.MAPGET``: the node side of membership
changes (``raftkv.membership``) and of the cluster's replicated shard map (``raftkv.mapregister``)."""

from __future__ import annotations

import asyncio
import logging
import tomllib
from collections.abc import Iterable
from typing import Any

from raftkv import mapregister
from raftkv.protocol import OK, Error
from raftkv.replica import ShardReplica
from raftkv.results import CmdError
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


def shrink_allowed(old: ShardMap, new: ShardMap, opened: Iterable[tuple[int, int]] = ()) -> bool:
    """May a node holding ``old`` install ``new`` with fewer shards?  Only one less, and only once that shard's
    removal was marked (``raftkv shard remove`` moves its keys before it writes ``new``): ``old`` marks it, or
    (a node that missed that map: a lost push, a restart from an older cluster file, then the map register
    giving it the newest) this node's own replicas show it done: ``opened`` holds ``(ring shards, epoch)`` of
    the replicas with no move under way, and one opened under the ring without that shard after ``old``'s
    epoch (``raftkv.reshard``: only a removal opens a shard under a smaller ring)."""
    if new.nshards != old.nshards - 1 or new.epoch <= old.epoch:
        return False
    return old.removing == new.nshards or any(n == new.nshards and e > old.epoch for n, e in opened)


def parse_map(text: bytes | str, where: str) -> ShardMap | Error:
    """A pushed or replicated map's text, parsed and checked (no secrets: nodes keep their own)."""
    try:
        raw = text.decode() if isinstance(text, bytes) else text
        return ShardMap.from_dict(tomllib.loads(raw), source=where)
    except (ShardMapError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        return Error("ERR", f"{where}: {e}")


def map_refusal(node: NodeAPI, new: ShardMap, where: str, from_register: bool = False) -> Error | None:
    """Why this node will not take ``new`` as its map (whatever its epoch); None: it may.

    ``from_register``: ``new`` was read from the cluster's map register (a linearizable read on shard 0, or this
    node's own replica of it), where ``raftkv shard remove`` writes the smaller map only after the keys moved.
    """
    # The shard count changes only through `raftkv shard add|remove` (raftkv.reshard): an add installs the map
    # that places the new shard's group, then the one whose ring includes it; a removal the map that marks the
    # last shard as being removed, then (its keys moved) the one without it. So a pushed map with fewer shards
    # is taken only once the removal of exactly the shard it drops was marked (shrink_allowed). The register
    # holds only maps whose removal is over, so a node that missed the marking map (one with no replica left to
    # show the removal done, e.g. added --empty) takes the smaller map from it.
    if new.vnodes != node.map.vnodes:
        return Error("ERR", f"{where}: vnodes cannot change")
    if new.nshards < node.map.nshards and not from_register:
        opened = [(r.state.owner.nshards, r.state.owner.epoch) for r in list(node.replicas.values())
                  if r.state.owner is not None and r.state.move is None]
        if not shrink_allowed(node.map, new, opened):
            return Error("ERR", f"{where}: the shard count cannot shrink ({node.map.nshards} -> {new.nshards}) "
                                "unless the removal of that shard was marked ('raftkv shard remove' installs "
                                "that map first; run it again)")
    if node.name not in new.nodes:
        return Error("ERR", f"{where}: this node ({node.name}) is not in the new map")
    return None


def adopt_map(node: NodeAPI, new: ShardMap, where: str, from_register: bool = False) -> Error | None:
    """Install ``new`` if it is newer than the node's map and acceptable (``map_refusal``); None, or why not."""
    refused = map_refusal(node, new, where, from_register)
    if refused is None and new.epoch > node.map.epoch:
        node.install_map(new)
    return refused


MAP_POLL_S = 2.0  # how often a node reads the cluster's map register (a missed push is installed by then)


async def map_poll_loop(node: NodeAPI) -> None:
    """Install the cluster's map whenever its register holds a newer one than this node's (at start-up too:
    a node started from an old cluster file, or one no push reached, catches up within ``MAP_POLL_S``)."""
    while True:
        try:
            await _poll_map(node)
        except Exception:  # noqa: BLE001 - a background loop must outlive one bad round; it says why
            log.exception("event=map_poll_failed node=%s", node.name)
        await asyncio.sleep(MAP_POLL_S)


async def _poll_map(node: NodeAPI) -> None:
    replica = node.replicas.get(mapregister.MAP_SHARD)
    if replica is not None:  # this node's own replica: maybe behind, never wrong (epochs only grow)
        reg: Any = replica.state.map_register
    else:
        reg = await node.execute(mapregister.MAP_SHARD, ("map_get",), read=True)
    if isinstance(reg, (tuple, list)) and len(reg) == 2 and reg[0] > node.map.epoch:  # the codec makes lists
        new = parse_map(reg[1], "the cluster's map register")
        refused = new if isinstance(new, Error) else adopt_map(node, new, "the cluster's map register",
                                                               from_register=True)
        if refused is not None:
            log.warning("event=map_not_installed node=%s epoch=%d reason=%s", node.name, reg[0], refused.message)


def cmd_map(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    """RAFTKV.MAP toml: install a newer shard map (routing, status); answers the node's epoch."""
    new = parse_map(req[1], "RAFTKV.MAP")
    if isinstance(new, Error):
        return new
    return adopt_map(node, new, "RAFTKV.MAP") or node.map.epoch


def cmd_mapcas(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    """RAFTKV.MAPCAS expected_epoch toml: make ``toml`` the cluster's map if the register is at
    ``expected_epoch`` (``raftkv.mapregister``); answers the new epoch, or ``-MAPCHANGED epoch ...``."""
    try:
        expected = int(req[1])
    except ValueError:
        return Error("ERR", "RAFTKV.MAPCAS: expected epoch must be an integer")
    new = parse_map(req[2], "RAFTKV.MAPCAS")
    if isinstance(new, Error):
        return new
    if new.security:
        return Error("ERR", "RAFTKV.MAPCAS: the map must not carry [security] (it is readable by every node)")

    async def go() -> Any:
        res = await node.execute(mapregister.MAP_SHARD, ("map_cas", expected, new.epoch, req[2].decode()),
                                 idempotent=True)  # a retry of the same change answers as the first did
        if isinstance(res, CmdError):
            return Error(res.code, res.message)
        if isinstance(res, Error):
            return res
        adopt_map(node, new, "RAFTKV.MAPCAS")  # the others learn it from the push, or their next poll
        return res
    return node.run(go())


def cmd_mapget(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    """RAFTKV.MAPGET: ``[epoch, toml]`` of the cluster's map (a linearizable read), or nil if it was never
    changed since the cluster file bootstrapped it."""
    async def go() -> Any:
        res = await node.execute(mapregister.MAP_SHARD, ("map_get",), read=True)
        if isinstance(res, CmdError):
            return Error(res.code, res.message)
        if res is None or isinstance(res, Error):
            return res
        return [res[0], res[1].encode()]
    return node.run(go())


COMMANDS: dict[bytes, Command] = {
    b"RAFTKV.MEMBER": Command(-3, cmd_member, leader_only=True, access=admin_access),
    b"RAFTKV.MAP": Command(2, cmd_map, access=admin_access),
    b"RAFTKV.MAPCAS": Command(3, cmd_mapcas, access=admin_access),
    b"RAFTKV.MAPGET": Command(1, cmd_mapget, access=admin_access),
}


