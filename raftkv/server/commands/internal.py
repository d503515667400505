"""The node-to-node commands: ``RAFTKV.CHALLENGE``/``RAFTKV.NODEAUTH`` (a peer proves it is a
node of this cluster, see ``raftkv.security``) and ``RAFTKV.RPC message`` (``raftkv.server.rpc``).

``RAFTKV.RPC`` runs only on a connection that proved node identity; the
dispatcher answers ``-NOPERM`` to anyone else before the message is decoded.
Its reply is always a bulk string holding the encoded result, so errors, nils
and simple strings reach the origin exactly as the leader produced them.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from raftkv.protocol import OK, Error
from raftkv.server import rpc
from raftkv.server.api import Command, NodeAPI
from raftkv.server.conn import Conn


def cmd_rpc(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    try:
        msg = rpc.decode_message(req[1])
    except rpc.MalformedMessage as e:
        return Error("ERR", f"RAFTKV.RPC: {e}")
    return node.run(_run(node, conn, msg))


async def _run(node: NodeAPI, conn: Conn, msg: tuple) -> bytes:
    try:
        result = await _handle(node, conn, msg)
    except (ValueError, TypeError, IndexError) as e:
        result = Error("ERR", f"RAFTKV.RPC: malformed {msg[0]} message ({e})")
    return rpc.encode(result)


async def _handle(node: NodeAPI, conn: Conn, msg: tuple) -> Any:
    kind = msg[0]
    if kind == "exec":
        _, shard, cmd, read, idempotent, hops, budget_s = msg
        return await node.execute(int(shard), tuple(cmd), read=bool(read), idempotent=bool(idempotent),
                                  hops=int(hops), budget_s=float(budget_s))
    if kind == "txn":
        txid, compares, then_ops, else_ops, hops, *rest = msg[1:]
        ring = rest[0] if rest else None  # absent from nodes of before ring tags; coordinate() checks it
        return await node.coordinate_at_home(str(txid), compares, then_ops, else_ops, int(hops), ring=ring)
    # "leader": an operator command, run here on behalf of a node that does not lead the shard
    _, _shard, request, hops = msg
    return await node.run_forwarded([bytes(a) for a in request], int(hops), conn.peer)


audit = logging.getLogger("raftkv.audit")


def cmd_challenge(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    """RAFTKV.CHALLENGE -> a fresh nonce for this connection."""
    conn.nonce = os.urandom(16).hex().encode()
    return conn.nonce


def cmd_nodeauth(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    """RAFTKV.NODEAUTH name mac: prove this connection comes from node ``name`` of this cluster."""
    name = req[1].decode(errors="replace")
    nonce, conn.nonce = conn.nonce, b""  # one answer per challenge
    if name not in node.map.nodes or not node.security.check_node(node.map.name, nonce, name, req[2]):
        node.audit("nodeauth", conn, "denied", f"claimed={name}")
        return Error("NOPERM", "node authentication failed: ask RAFTKV.CHALLENGE first and answer with the "
                               "cluster's node key")
    conn.node = name
    conn.authed = True
    return OK


COMMANDS: dict[bytes, Command] = {
    b"RAFTKV.CHALLENGE": Command(1, cmd_challenge, no_auth=True),
    b"RAFTKV.NODEAUTH": Command(3, cmd_nodeauth, no_auth=True),
    b"RAFTKV.RPC": Command(2, cmd_rpc, internal=True),
}
