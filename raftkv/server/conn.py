"""One client connection: framing with limits, in-order replies, per-connection state.

Theory of operation
-------------------
Bytes go through ``protocol.RequestParser``, which checks every declared array
and bulk length at its header: a bad header is answered ``-PROTO``, an oversize
one ``-TOOBIG``, and the connection closes before anything is allocated or
awaited.  Each request is dispatched at once (so its future starts in arrival
order) and its reply, or the future of one, goes into a bounded queue that one
writer task drains in order.  Reads wait for the connection's earlier writes,
so a pipelining client reads its own writes.

A client that vanishes is normal: the writer stops writing to a closed
transport (so asyncio never logs a flood of failed sends), the requests already
running still finish, and the event is counted, logged at debug level only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Protocol

from raftkv import protocol
from raftkv.heap import release_closed, transports_of
from raftkv.protocol import Error
from raftkv.server.api import Limits, MetricsAPI

if TYPE_CHECKING:
    from raftkv.security import Security

log = logging.getLogger("raftkv.conn")


class Server(Protocol):
    """What serving a connection needs of the node (``raftkv.server.node.Node``)."""

    clients: int
    limits: Limits
    security: Security
    metrics: MetricsAPI

    def auth_required(self) -> bool: ...

    def dispatch_ordered(self, conn: Conn, req: list[bytes]) -> Any: ...

    def count_reply(self, reply: Any, name: bytes | None, started: float) -> None: ...


class Conn:
    """Per-connection state."""

    __slots__ = ("readonly", "peer", "resp3", "txn", "authed", "last_write", "hops", "user", "node", "nonce",
                 "barrier")

    def __init__(self, peer: str, authed: bool = True, hops: int = 0, node: str | None = None) -> None:
        self.authed = authed
        self.user: str | None = None  # who AUTHenticated on this connection (None: the default user)
        # The cluster node this connection proved to be (RAFTKV.NODEAUTH): only then may it send RAFTKV.RPC.
        self.node = node
        self.nonce = b""  # the challenge this connection was last given
        self.barrier: asyncio.Future | None = None  # an AUTH in progress: later commands wait for it
        # Times the request was handed between nodes (internal RPC); clients' connections are 0.
        self.hops = hops
        # The newest write still in flight on this connection: a pipelined read
        # waits for it, so a connection reads its own writes (Redis pipeline order).
        self.last_write: asyncio.Future | None = None
        self.readonly = False
        self.peer = peer
        self.resp3 = False
        self.txn: Any = None  # WATCH/MULTI state (raftkv.server.commands.txn.ConnTxn)


async def serve_connection(node: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Serve one client connection until it closes, breaks a limit or sends garbage (or the node stops)."""
    try:
        await _serve(node, reader, writer)
    except asyncio.CancelledError:
        # The node is stopping. Ending here rather than cancelled keeps Python 3.11's stream protocol from
        # logging every open connection as an error ("Exception in callback ... CancelledError": its
        # done-callback asks a cancelled task for its exception; 3.12 checks first).
        pass


async def _serve(node: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    transports = transports_of(writer)
    peername = writer.get_extra_info("peername")
    conn = Conn(f"{peername[0]}:{peername[1]}" if peername else "?", not node.auth_required())
    limits = node.limits
    if node.clients >= limits.clients_max:
        writer.write(protocol.encode(Error("BUSY", f"max number of clients reached ({limits.clients_max})")))
        writer.close()
        await release_closed(writer, transports)
        return
    node.clients += 1
    parser = protocol.RequestParser(limits.request_bytes_max, limits.args_max)
    replies: asyncio.Queue = asyncio.Queue(maxsize=2 * limits.pipeline_depth_max)
    writer_task = asyncio.create_task(_write_replies(node, replies, writer, conn))
    idle = limits.idle_timeout_s or None
    try:
        while True:
            try:
                async with asyncio.timeout(idle):  # (wait_for would wrap every read in a task of its own)
                    data = await reader.read(65536)
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
                if replies.qsize() >= limits.pipeline_depth_max:
                    # Over the in-flight limit: refuse this command (the queue keeps one slot
                    # per refusal, so a client that never reads is throttled by TCP after that).
                    await replies.put(Error("BUSY", f"more than {limits.pipeline_depth_max} commands "
                                                    "in flight on this connection (pipeline_depth_max); "
                                                    "read replies before sending more"))
                    continue
                await replies.put((node.dispatch_ordered(conn, req), req[0], time.perf_counter()))
            if isinstance(parser.broken, protocol.RequestTooBig):
                await replies.put(Error("TOOBIG", str(parser.broken)))
                break
            if parser.broken is not None:
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
        node.clients -= 1
        await release_closed(writer, transports)


async def _write_replies(node: Server, replies: asyncio.Queue, writer: asyncio.StreamWriter, conn: Conn) -> None:
    gone = False
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
        node.count_reply(item, name, started if name is not None else 0.0)
        if gone:
            continue  # keep consuming: the commands already running still finish
        if writer.is_closing():
            gone = True
            node.metrics.client_gone.inc()
            log.debug("event=client_gone peer=%s", conn.peer)
            continue
        writer.write(protocol.encode(item, conn.resp3))
        if replies.empty():
            try:
                await writer.drain()
            except (ConnectionError, OSError):
                gone = True
                node.metrics.client_gone.inc()
                log.debug("event=client_gone peer=%s", conn.peer)
    if not gone and not writer.is_closing():
        try:
            await writer.drain()
        except (ConnectionError, OSError):
            node.metrics.client_gone.inc()
