"""Automatic leader balancing (``raftkv serve --balance-leaders``).

Each node runs ``raftkv.membership.plan_balance`` from its own view every
period and, once every shard has had the same leader for two checks (the
cluster has settled after a failover), hands away the shards the plan takes
from it, one per check.
"""

from __future__ import annotations

import asyncio
import logging

from raftkv.membership import plan_balance
from raftkv.server.api import NodeAPI

log = logging.getLogger("raftkv.membership")


def _local_view(node: NodeAPI) -> tuple[dict[int, str | None], set[str]]:
    leaders: dict[int, str | None] = {}
    alive = {node.name}
    for s in range(node.map.nshards):
        r = node.replicas.get(s)
        if r is None:
            leaders[s] = None
            continue
        addr = r.leader_addr()
        leaders[s] = None if addr is None else node.map.node_for_raft_addr(addr)
        for n in node.map.replicas(s):
            if r.peer_connected(n.raft_addr(s)):
                alive.add(n.name)
    return leaders, alive


async def balance_loop(node: NodeAPI, period: float) -> None:
    """Every ``period`` seconds, hand away one shard the balance plan takes from this node."""
    previous: dict | None = None
    while True:
        await asyncio.sleep(period)
        try:
            leaders, alive = _local_view(node)
            if any(v is None for v in leaders.values()) or leaders != previous:
                previous = leaders  # wait until every shard has had the same leader for two checks
                continue
            for s, src, dst in plan_balance(leaders, node.map.placement, sorted(alive)):
                replica = node.replicas.get(s)
                if src == node.name and replica is not None and replica.is_leader():
                    log.info("event=leader_balance shard=%d from=%s to=%s", s, src, dst)
                    replica.transfer_leadership(node.map.nodes[dst].raft_addr(s), lambda ok, why: None)
                    previous = None
                    break
        except Exception:  # never let the balancer take the node down
            log.exception("event=leader_balancer_error")
