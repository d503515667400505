"""Links to other nodes: one pipelined connection per peer, carrying ``RAFTKV.RPC``.

A link is a ``raftkv.aioconnection.AsyncConnection`` that opens with the
node-identity handshake (``RAFTKV.CHALLENGE`` -> nonce, ``RAFTKV.NODEAUTH
name mac``; see ``raftkv.security``); the RPCs pipeline behind it.  A call that
times out drops the link, so a message given up on cannot sit in a socket
buffer and arrive long after (the next call reconnects).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from raftkv import protocol
from raftkv.aioconnection import AsyncConnection
from raftkv.aioconnection import ConnectionLost as PeerUnreachable
from raftkv.server import rpc

__all__ = ["PeerLink", "PeerRefused", "PeerUnreachable"]


class PeerRefused(Exception):
    """The peer refused the RPC before running it (identity, limits): nothing ran there.

    Raised, not returned, so that no caller can mistake the refusal for the answer of the
    command it carried (a removed node forwarding to a leader that no longer knows it gets
    ``NOPERM`` here; that says nothing about a write an earlier attempt may have applied).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code} {message}")
        self.code, self.message = code, message


class PeerLink:
    """One pipelined, node-authenticated connection to another node."""

    def __init__(self, host: str, port: int, identify: Callable[[bytes], list[bytes]], ssl_ctx: Any = None) -> None:
        self.identify = identify  # challenge nonce -> the RAFTKV.NODEAUTH command that answers it
        self.conn = AsyncConnection(host, port, ssl_ctx, opening=self._handshake)

    async def rpc(self, message: tuple, timeout: float) -> Any:
        """Send one RPC message; its decoded reply (the command's own ``Error`` comes back as an ``Error``).

        Raises ``PeerUnreachable`` (no reply) or ``PeerRefused`` (the peer refused the RPC itself: not run).
        """
        reply = await self.conn.call(rpc.COMMAND, rpc.encode(message), timeout=timeout)
        if isinstance(reply, protocol.ReplyError):  # refused before it ran (identity, limits)
            raise PeerRefused(reply.code, reply.message)
        try:
            return rpc.decode(reply)
        except rpc.MalformedMessage as e:
            raise PeerUnreachable(f"{self.conn.host}:{self.conn.port}: {e}", sent=True) from None

    async def _handshake(self, conn: AsyncConnection) -> None:
        nonce = await conn.send(b"RAFTKV.CHALLENGE")
        if not isinstance(nonce, bytes):
            conn.close()
            raise ConnectionRefusedError(f"node handshake refused: {nonce}")
        # Awaited, not pipelined ahead of the first RPC: a peer that does not know this node yet (it was
        # just added, and the peer's map comes a moment later) refuses, and an unauthenticated link kept
        # open would refuse every later RPC too. Refused, the link is dropped and the next RPC reconnects.
        answered = await conn.send(*self.identify(nonce))
        if isinstance(answered, protocol.ReplyError):
            conn.close()
            raise ConnectionRefusedError(f"node handshake refused: {answered}")
