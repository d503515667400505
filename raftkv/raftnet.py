"""raftkv.raftnet: one multiplexed Raft transport per node.

Theory of operation
-------------------
A node hosts one Raft group member per shard. Instead of one listening port and one TCP connection per peer
*per group* (pysyncobj's ``TCPTransport``), a ``RaftNetwork`` listens on the node's one ``raft_port`` and keeps
one TCP connection per peer *node*; every group's messages travel on it, each frame tagged with the group
(shard) id. Each group gets a ``MuxTransport`` (pysyncobj's ``Transport`` interface) that sends through the
network and receives what the network dispatches to it.

Node ids. Inside a group, members keep their logical ids ``host:(raft_port + shard)`` (membership changes,
status and the shard map use them). A group's transport maps such an id to the owning node's endpoint
``host:raft_port`` by subtracting the shard number, which needs no shard map and so stays right after
``raftkv node add/replace`` even before the new map reaches this node. An incoming frame for group ``g`` from
endpoint ``host:p`` comes from member ``host:(p + g)``.

Connections. The node whose endpoint string is larger dials (pysyncobj's rule); the other only accepts. A lost
connection is redialed with exponential backoff (``RECONNECT_MIN_S`` .. ``RECONNECT_MAX_S``). If two
connections to one peer are open at once (a peer restarted and redialed before we noticed the old one died,
or two nodes disagree on the rule), the one dialed by the larger endpoint wins, and among two of the same
direction the newer one. A connection is dead when nothing was read for ``timeout_s`` (partitions that drop
packets never close TCP); every connection carries an empty heartbeat record when it sent nothing for
``timeout_s / 4``. Every group whose members live on a peer is told ``_onNodeConnected`` /
``_onNodeDisconnected`` for those members when the peer's connection opens or closes, so pysyncobj's
``__connectedToAnyone()`` and its election logic see what they would with ``TCPTransport``.

Handshake (not pickle: nothing is unpickled before the peer is authenticated). ``key`` is the cluster's Raft
secret (or node key); ``MAC(x) = HMAC-SHA256(key, "raftkv-raftnet-v1|" + x)``::

    dialer   -> acceptor   HELLO  = MAGIC, nonce_d (32 random bytes), dialer id, acceptor id
    acceptor -> dialer     WELCOME = MAGIC, nonce_a (32 random bytes), MAC("acc" | transcript)
    dialer   -> acceptor   PROOF  = MAC("dial" | transcript)

where ``transcript = cluster | nonce_d | nonce_a | dialer id | acceptor id``. Each side proves it holds the
key over nonces it did not choose, so a recorded handshake cannot be replayed. With ``encrypt`` the
per-direction keys are ``MAC("d2a" | transcript)`` and ``MAC("a2d" | transcript)`` and every record after the
handshake is AES-256-GCM sealed with a 96-bit nonce = the record's sequence number in that direction: a
dropped, replayed, reordered or altered record fails to open and closes the connection. Without ``encrypt``
(no secret: the node then listens on loopback only, ``raftkv.security.check_bind``) records are plain.

Wire format: every message on a connection is a *record*: a 4-byte big-endian length, then the body (sealed
or plain). A record's plaintext after the handshake is zero or more *frames*: ``u32 tag`` (the group and its
incarnation, ``wire_tag``), ``u32 length``, ``pickle(message)``. The driver sends one record per connection
per loop, holding every frame queued in it; an empty record is a heartbeat.

Concurrency contract: after ``start`` every method is called on the one driver thread (``raftkv.driver``),
which also runs every pysyncobj callback this module makes. Nothing here blocks: sockets are non-blocking,
connects are asynchronous.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import logging
import os
import pickle
import selectors
import socket
import struct
import time
from collections.abc import Callable, Iterable
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pysyncobj.node import Node
from pysyncobj.transport import Transport

__all__ = ["MuxTransport", "RaftNetwork", "endpoint_of", "member_id", "probe"]

log = logging.getLogger("raftkv.raftnet")

MAGIC = b"RKVMUX1\n"
NONCE_BYTES = 32
MAC_BYTES = 32
ID_BYTES_MAX = 255
RECORD_BYTES_MAX = 256 << 20  # a snapshot chunk or a large AppendEntries batch fits; a forged length does not
HANDSHAKE_BYTES_MAX = 1024
RECV_BYTES = 256 << 10
RECV_PER_POLL_MAX = 2 << 20  # one connection may not starve the others within one loop (nor a snapshot hold it long)
UNSENT_BYTES_MAX = 256 << 20  # a peer that stopped reading is dropped rather than buffered forever
RECONNECT_MIN_S = 0.05
# A node that comes back (restart, new follower) is dialed by its peers within this: at 1.0 s it waited 0.5 s on
# average before any leader could reach it, a fifth of a new follower's catch-up by snapshot. A dial to a
# node that is down costs one refused connect (loopback) or one connect timeout.
RECONNECT_MAX_S = 0.25
_LEN = struct.Struct(">I")
_FRAME = struct.Struct(">II")
_SEQ_PREFIX = b"\0\0\0\0"
_DOMAIN = b"raftkv-raftnet-v1|"


def endpoint_of(member: str, shard: int) -> str:
    """The node endpoint ``host:raft_port`` owning group member ``host:(raft_port + shard)``."""
    host, port = member.rsplit(":", 1)
    return f"{host}:{int(port) - shard}"


def member_id(endpoint: str, shard: int) -> str:
    """The id in group ``shard`` of the member on node endpoint ``host:raft_port``."""
    host, port = endpoint.rsplit(":", 1)
    return f"{host}:{int(port) + shard}"


class _Sealer:
    """One direction of an authenticated connection: AES-GCM with a counter nonce, or plain."""

    def __init__(self, key: bytes | None) -> None:
        self._aead = AESGCM(key) if key is not None else None
        self._seq = 0

    def _nonce(self) -> bytes:
        """The next record's nonce: its sequence number in this direction (never reused under one key)."""
        self._seq += 1
        return _SEQ_PREFIX + (self._seq - 1).to_bytes(8, "big")

    def seal(self, plaintext: bytes) -> bytes:
        return plaintext if self._aead is None else self._aead.encrypt(self._nonce(), plaintext, None)

    def open(self, body: bytes) -> bytes:
        """The plaintext; raises ``cryptography.exceptions.InvalidTag`` on a forged or out-of-order record."""
        return body if self._aead is None else self._aead.decrypt(self._nonce(), body, None)


class _Conn:
    """One TCP connection to a peer node: handshake state, buffers and the record codec."""

    def __init__(self, sock: socket.socket, dialed: bool, peer: str | None, now: float) -> None:
        self.sock = sock
        self.dialed = dialed
        self.peer = peer  # the peer's endpoint: known up front when dialed, from HELLO when accepted
        self.state = "connecting" if dialed else "hello"
        self.rbuf = bytearray()
        self.wbuf = bytearray()
        self.frames: list[bytes] = []  # frames queued this loop, sealed into one record by flush()
        self.early: list[bytes] = []  # leaders' AppendEntries, which may leave before the loop's sync
        self.opened_at = now
        self.last_read = now
        self.last_write = now
        self.nonce_mine = os.urandom(NONCE_BYTES)
        self.nonce_peer = b""
        self.tx = _Sealer(None)
        self.rx = _Sealer(None)
        self.want_write = False

    @property
    def open(self) -> bool:
        return self.state == "open"

    def write_record(self, body: bytes) -> None:
        self.wbuf += _LEN.pack(len(body))
        self.wbuf += body

    def next_record(self) -> bytes | None:
        """The next complete record received, or None (raises ValueError on an oversized length)."""
        buf = self.rbuf
        if len(buf) < 4:
            return None
        (n,) = _LEN.unpack_from(buf, 0)
        limit = RECORD_BYTES_MAX if self.open else HANDSHAKE_BYTES_MAX
        if n > limit:
            raise ValueError(f"record of {n} bytes exceeds {limit}")
        if len(buf) - 4 < n:
            return None
        with memoryview(buf) as whole:  # one copy (slicing the bytearray would make two)
            body = bytes(whole[4:4 + n])
        del buf[:4 + n]
        return body


def wire_tag(shard: int, incarnation: int = 0) -> int:
    """The u32 a frame of group ``shard`` of ``incarnation`` (``ShardMap.born``) carries.

    Groups of the cluster's first map (incarnation 0) carry the bare shard id, as before incarnations existed.
    A shard removed and added again is a new group: its frames carry the incarnation in the high 16 bits, so a
    node still running the old group (it missed the maps) can neither vote in the new one nor feed it its old
    log, and the new one's frames do not reach the old (frames with a tag no group here has are dropped).
    Incarnations 65,535 epochs apart share a tag.
    """
    if not 0 <= shard < 1 << 16:
        raise ValueError(f"shard id {shard} out of range")
    return shard if incarnation == 0 else shard | (((incarnation - 1) % 0xFFFF + 1) << 16)


class MuxTransport(Transport):
    """pysyncobj ``Transport`` of one group (shard) on a ``RaftNetwork``.

    Built by pysyncobj through ``RaftNetwork.transport_class(shard)``; joins the network when the driver adopts
    the group (``RaftNetwork.attach``) and leaves it on ``destroy``. Driver thread only.
    """

    def __init__(self, network: RaftNetwork, shard: int, syncObj: Any, selfNode: Node | None,  # noqa: N803
                 otherNodes: Iterable[Node], incarnation: int = 0) -> None:  # noqa: N803 - pysyncobj's signature
        super().__init__(syncObj, selfNode, otherNodes)
        self.network = network
        self.shard = shard
        self.tag = wire_tag(shard, incarnation)
        self.nodes: dict[str, Node] = {n.id: n for n in otherNodes}
        self.reported: set[Node] = set()  # members we told pysyncobj are connected

    # -- pysyncobj's Transport interface ------------------------------------------------------------------
    def tryGetReady(self) -> None:  # noqa: N802
        """Nothing to bind per group: the network listens for every group."""

    @property
    def ready(self) -> bool:
        return True

    def waitReady(self) -> None:  # noqa: N802
        """Always ready (see ``tryGetReady``)."""

    def addNode(self, node: Node) -> None:  # noqa: N802
        self.nodes[node.id] = node
        self.network.refresh(self)

    def dropNode(self, node: Node) -> None:  # noqa: N802
        self.nodes.pop(node.id, None)
        self.reported.discard(node)
        self.network.refresh(self)

    def send(self, node: Node, message: Any) -> bool:
        return self.network.send(self.tag, endpoint_of(node.id, self.shard), message)

    def destroy(self) -> None:
        self.network.detach(self)

    def unsent(self, node: Node) -> int:
        """Bytes queued for ``node``'s node that its socket has not taken yet (every group's frames)."""
        return self.network.unsent(endpoint_of(node.id, self.shard))

    # -- from the network -----------------------------------------------------------------------------------
    def endpoints(self) -> set[str]:
        return {endpoint_of(member, self.shard) for member in self.nodes}

    def deliver(self, endpoint: str, message: Any) -> None:
        member = member_id(endpoint, self.shard)
        node = self.nodes.get(member)
        if node is None:
            # Not a member in our configuration. Raft processes a leader's AppendEntries whatever the receiver's
            # configuration says (thesis 4.1): ours may hold an uncommitted change that removed that leader,
            # which only its entries can truncate (seen in the member nemesis: a follower whose log removed the
            # leader of a later term dropped everything it sent, and the group could not commit again).
            # Everything else from a non-member (votes, pre-votes, replies) is dropped, as TCPTransport would.
            if not (isinstance(message, dict) and message.get("type") == "append_entries"):
                return
            node = Node(member)
        self._onMessageReceived(node, message)

    def sync_connected(self, is_open: Callable[[str], bool]) -> None:
        """Report every member whose node's connection opened or closed since the last call."""
        for node in list(self.nodes.values()):
            up = is_open(endpoint_of(node.id, self.shard))
            if up and node not in self.reported:
                self.reported.add(node)
                self._onNodeConnected(node)
            elif not up and node in self.reported:
                self.reported.discard(node)
                self._onNodeDisconnected(node)


class RaftNetwork:
    """The node's one Raft listener and its connections to peer nodes (see module doc)."""

    def __init__(self, host: str, port: int, *, cluster: str, key: bytes, encrypt: bool,
                 timeout_s: float = 1.0, backlog: int = 128) -> None:
        self.host, self.port = host, port
        self.endpoint = f"{host}:{port}"
        self.cluster = cluster.encode()
        self.key = key
        self.encrypt = encrypt
        self.timeout_s = timeout_s
        self.selector = selectors.DefaultSelector()
        self.listener = socket.create_server((host, port), backlog=backlog, reuse_port=False)
        self.listener.setblocking(False)
        self.selector.register(self.listener, selectors.EVENT_READ, None)
        self.groups: dict[int, MuxTransport] = {}
        self.conns: set[_Conn] = set()
        self.open: dict[str, _Conn] = {}  # peer endpoint -> the connection its frames travel on
        self.dialing: dict[str, _Conn] = {}
        self.retry: dict[str, tuple[float, float]] = {}  # endpoint -> (next dial time, current backoff)
        self.needs_sync = False  # a connection opened/closed or a group changed: report to groups
        self.closed = False
        self.stats = {"records_out": 0, "records_in": 0, "frames_out": 0, "frames_in": 0, "dials": 0,
                      "accepted": 0, "refused": 0, "lost": 0}
        self._wakers: dict[int, Callable[[], None]] = {}
        self._wanted: set[str] | None = None  # peer endpoints some group has members on; None: recompute

    # -- groups ---------------------------------------------------------------------------------------------
    def transport_class(self, shard: int, incarnation: int = 0) -> Callable[[Any, Any, Any], MuxTransport]:
        """What to pass as pysyncobj's ``transportClass`` for group ``shard`` of ``incarnation``."""
        return lambda sync_obj, self_node, other_nodes: MuxTransport(self, shard, sync_obj, self_node,
                                                                     other_nodes, incarnation)

    def attach(self, transport: MuxTransport) -> None:
        """Route the frames tagged ``transport.tag`` (``wire_tag``) to ``transport`` (driver thread)."""
        if transport.tag in self.groups and self.groups[transport.tag] is not transport:
            raise ValueError(f"group {transport.shard} is already attached to this network")
        self.groups[transport.tag] = transport
        self.needs_sync = True
        self._wanted = None

    def detach(self, transport: MuxTransport) -> None:
        if self.groups.get(transport.tag) is transport:
            del self.groups[transport.tag]
        self.needs_sync = True
        self._wanted = None

    def refresh(self, transport: MuxTransport) -> None:
        """A group's members changed: dial new peers and report their state on the next poll."""
        self.needs_sync = True
        self._wanted = None

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        """Also wait on ``fd`` (the driver's wake pipe); ``callback`` runs when it is readable."""
        self._wakers[fd] = callback
        self.selector.register(fd, selectors.EVENT_READ, callback)

    # -- sending ----------------------------------------------------------------------------------------------
    def send(self, tag: int, endpoint: str, message: Any) -> bool:
        """Queue ``message`` for the group tagged ``tag`` (``wire_tag``) on ``endpoint``; False if that node is
        not connected."""
        conn = self.open.get(endpoint)
        if conn is None:
            return False
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        frame = _FRAME.pack(tag, len(data)) + data
        # A leader's AppendEntries may leave before its own entries are durable (Raft lets the leader write its
        # log in parallel with replicating it: it counts itself only once they are, raftfix), so the follower's
        # fsync overlaps the leader's. Everything else waits for the loop's sync: votes and terms (written by
        # it), and acks (released by it).
        (conn.early if isinstance(message, dict) and message.get("type") == "append_entries"
         else conn.frames).append(frame)
        return True

    def unsent(self, endpoint: str) -> int:
        """Bytes queued for ``endpoint`` not yet taken by its socket (0 if not connected): a sender of bulk
        data (a snapshot) waits while this is large, so what it queues never delays the frames behind it
        (heartbeats, votes) by more than that much."""
        conn = self.open.get(endpoint)
        if conn is None:
            return 0
        return len(conn.wbuf) + sum(map(len, conn.early)) + sum(map(len, conn.frames))

    def flush_early(self) -> None:
        """Send the frames that need no sync first (``send``): the driver calls it before the loop's sync."""
        now = time.monotonic()
        for conn in list(self.open.values()):
            if conn.early:
                self._seal(conn, conn.early)
                self._write(conn, now)

    def flush(self) -> None:
        """Seal each connection's queued frames into one record and write what the sockets take."""
        now = time.monotonic()
        for conn in list(self.open.values()):
            if conn.early:
                conn.frames[:0] = conn.early  # queued before the loop's sync step ran (no driver, or tests)
                conn.early.clear()
            if conn.frames:
                self._seal(conn, conn.frames)
            elif now - conn.last_write >= self.timeout_s / 4:
                conn.write_record(conn.tx.seal(b""))  # heartbeat: the peer's read timeout measures silence
            if conn.wbuf:
                self._write(conn, now)

    def _seal(self, conn: _Conn, frames: list[bytes]) -> None:
        """Seal ``frames`` (emptied) into one record on ``conn``'s write buffer."""
        self.stats["frames_out"] += len(frames)
        conn.write_record(conn.tx.seal(b"".join(frames)))
        frames.clear()
        self.stats["records_out"] += 1

    def _write(self, conn: _Conn, now: float) -> None:
        try:
            sent = conn.sock.send(conn.wbuf)
        except BlockingIOError:
            sent = 0
        except OSError as e:
            self._close(conn, f"send: {e}")
            return
        if sent:
            del conn.wbuf[:sent]
            conn.last_write = now
        if len(conn.wbuf) > UNSENT_BYTES_MAX:
            self._close(conn, f"peer is not reading ({len(conn.wbuf)} bytes unsent)")
            return
        self._want_write(conn, bool(conn.wbuf))

    def _want_write(self, conn: _Conn, want: bool) -> None:
        if want != conn.want_write:
            conn.want_write = want
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
            self.selector.modify(conn.sock, events, conn)

    # -- the loop step ------------------------------------------------------------------------------------------
    def poll(self, timeout: float) -> set[int]:
        """Wait up to ``timeout`` for sockets or a wake-up; read, and dispatch frames to their groups.

        Returns the groups that received frames. Also dials, times out dead connections and reports
        connection changes to the groups.
        """
        now = time.monotonic()
        self._maintain(now)
        active: set[int] = set()
        for key, events in self.selector.select(timeout):
            target = key.data
            if target is None:
                self._accept()
            elif isinstance(target, _Conn):
                if target not in self.conns:
                    continue  # closed earlier in this batch
                if events & selectors.EVENT_WRITE:
                    self._on_writable(target)
                if events & selectors.EVENT_READ and target in self.conns:
                    self._on_readable(target, active)
            else:
                target()
        # Silence is judged after the sockets were read: judged before, a loop of ours that was busy for longer
        # than the timeout (a large snapshot chunk installed) dropped peers whose frames were waiting unread.
        now = time.monotonic()
        for conn in list(self.conns):
            if conn.state != "connecting" and now - conn.last_read > self.timeout_s:
                self._close(conn, f"nothing read for {self.timeout_s:g} s")
        if self.needs_sync:
            self.needs_sync = False
            for transport in list(self.groups.values()):
                transport.sync_connected(lambda ep: ep in self.open)
            self._maintain(time.monotonic())
        return active

    def _maintain(self, now: float) -> None:
        for conn in list(self.conns):
            if conn.state == "connecting" and now - conn.opened_at > self.timeout_s:
                self._close(conn, "connect timed out")
            elif conn.state != "open" and now - conn.opened_at > 2 * self.timeout_s:
                self._close(conn, "handshake timed out")
        if self._wanted is None:  # recomputed only when a group or its members changed
            self._wanted = set()
            for transport in self.groups.values():
                self._wanted |= transport.endpoints()
        for endpoint in self._wanted:
            if endpoint <= self.endpoint or endpoint in self.open or endpoint in self.dialing:
                continue  # the larger endpoint dials; the other side waits for us
            due, _backoff = self.retry.get(endpoint, (0.0, 0.0))
            if now >= due:
                self._dial(endpoint, now)

    # -- connection setup ------------------------------------------------------------------------------------
    def _dial(self, endpoint: str, now: float) -> None:
        _due, backoff = self.retry.get(endpoint, (0.0, 0.0))
        backoff = min(RECONNECT_MAX_S, max(RECONNECT_MIN_S, backoff * 2))
        self.retry[endpoint] = (now + backoff, backoff)
        host, port = endpoint.rsplit(":", 1)
        self.stats["dials"] += 1
        try:
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        except OSError as e:
            log.warning("event=raftnet_dial_failed peer=%s err=%s", endpoint, e)
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rc = sock.connect_ex((host, int(port)))
        if rc not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            sock.close()
            return
        conn = _Conn(sock, dialed=True, peer=endpoint, now=now)
        self.conns.add(conn)
        self.dialing[endpoint] = conn
        self.selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)
        conn.want_write = True

    def _accept(self) -> None:
        while True:
            try:
                sock, _addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("event=raftnet_accept_failed err=%s", e)
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(sock, dialed=False, peer=None, now=time.monotonic())
            self.stats["accepted"] += 1
            self.conns.add(conn)
            self.selector.register(sock, selectors.EVENT_READ, conn)

    def _on_writable(self, conn: _Conn) -> None:
        if conn.state == "connecting":
            err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._close(conn, os.strerror(err), quiet=True)
                return
            conn.state = "welcome"  # connected: say HELLO, await WELCOME
            ids = _ids(self.endpoint, conn.peer or "")
            conn.write_record(MAGIC + conn.nonce_mine + ids)
        if conn.wbuf:
            self._write(conn, time.monotonic())
        else:
            self._want_write(conn, False)

    def _on_readable(self, conn: _Conn, active: set[int]) -> None:
        received = 0
        while received < RECV_PER_POLL_MAX:
            try:
                data = conn.sock.recv(RECV_BYTES)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self._close(conn, f"recv: {e}", quiet=True)
                return
            if not data:
                self._close(conn, "closed by peer", quiet=True)
                return
            conn.rbuf += data
            received += len(data)
        conn.last_read = time.monotonic()
        try:
            while conn in self.conns and (body := conn.next_record()) is not None:
                if conn.open:
                    self._on_record(conn, conn.rx.open(body), active)
                else:
                    self._on_handshake(conn, body)
        except Exception as e:  # malformed, forged or replayed input: drop the connection, never the node
            self._close(conn, f"bad input: {type(e).__name__}: {e}")

    def _on_handshake(self, conn: _Conn, body: bytes) -> None:
        if conn.state == "hello":  # acceptor: HELLO
            if not body.startswith(MAGIC) or len(body) < len(MAGIC) + NONCE_BYTES + 2:
                raise ValueError("not a raftkv Raft peer")
            conn.nonce_peer = body[len(MAGIC):len(MAGIC) + NONCE_BYTES]
            dialer, target = _parse_ids(body[len(MAGIC) + NONCE_BYTES:])
            if target != self.endpoint or dialer == self.endpoint:
                raise ValueError(f"HELLO from {dialer!r} for {target!r}: this node is {self.endpoint!r}")
            conn.peer = dialer
            transcript = self._transcript(conn.nonce_peer, conn.nonce_mine, dialer, self.endpoint)
            conn.write_record(MAGIC + conn.nonce_mine + self._mac(b"acc", transcript))
            conn.state = "proof"
            self._write(conn, time.monotonic())
        elif conn.state == "welcome":  # dialer: WELCOME
            if not body.startswith(MAGIC) or len(body) != len(MAGIC) + NONCE_BYTES + MAC_BYTES:
                raise ValueError("not a raftkv Raft peer")
            conn.nonce_peer = body[len(MAGIC):len(MAGIC) + NONCE_BYTES]
            assert conn.peer is not None
            transcript = self._transcript(conn.nonce_mine, conn.nonce_peer, self.endpoint, conn.peer)
            if not hmac.compare_digest(body[len(MAGIC) + NONCE_BYTES:], self._mac(b"acc", transcript)):
                self.stats["refused"] += 1
                raise ValueError("peer failed to prove the cluster key")
            conn.write_record(self._mac(b"dial", transcript))
            self._established(conn, transcript, mine=b"d2a", theirs=b"a2d")
        elif conn.state == "proof":  # acceptor: PROOF
            assert conn.peer is not None
            transcript = self._transcript(conn.nonce_peer, conn.nonce_mine, conn.peer, self.endpoint)
            if not hmac.compare_digest(body, self._mac(b"dial", transcript)):
                self.stats["refused"] += 1
                raise ValueError("peer failed to prove the cluster key")
            self._established(conn, transcript, mine=b"a2d", theirs=b"d2a")

    def _established(self, conn: _Conn, transcript: bytes, mine: bytes, theirs: bytes) -> None:
        peer = conn.peer
        assert peer is not None
        if self.encrypt:
            conn.tx = _Sealer(self._mac(mine, transcript))
            conn.rx = _Sealer(self._mac(theirs, transcript))
        conn.state = "open"
        if self.dialing.get(peer) is conn:
            del self.dialing[peer]
        old = self.open.get(peer)
        if old is not None and _preferred(old, conn, self.endpoint, peer) is old:
            self._close(conn, "duplicate connection", quiet=True)
            return
        self.open[peer] = conn
        self.retry.pop(peer, None)
        if old is not None:
            self._close(old, "replaced by a newer connection", quiet=True)
        log.info("event=raftnet_connected peer=%s dialed=%s encrypted=%s", peer, conn.dialed, self.encrypt)
        self.needs_sync = True
        self._write(conn, time.monotonic())

    def _on_record(self, conn: _Conn, plaintext: bytes, active: set[int]) -> None:
        self.stats["records_in"] += 1
        peer = conn.peer
        assert peer is not None
        view = memoryview(plaintext)
        pos = 0
        while pos < len(view):
            tag, n = _FRAME.unpack_from(view, pos)
            data = view[pos + _FRAME.size:pos + _FRAME.size + n]
            if len(data) != n:
                raise ValueError("truncated frame")
            pos += _FRAME.size + n
            self.stats["frames_in"] += 1
            transport = self.groups.get(tag)
            if transport is None:
                continue  # a group this node does not host (yet), or another incarnation of it: Raft retries
            # Safe to unpickle: the record was authenticated (or, without a secret, the node listens on
            # loopback only, as with pysyncobj's TCPTransport).
            transport.deliver(peer, pickle.loads(data))
            active.add(transport.shard)

    # -- teardown -------------------------------------------------------------------------------------------------
    def _close(self, conn: _Conn, why: str, quiet: bool = False) -> None:
        if conn not in self.conns:
            return
        self.conns.discard(conn)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn.sock)
        with contextlib.suppress(OSError):
            conn.sock.close()
        if conn.peer is not None and self.dialing.get(conn.peer) is conn:
            del self.dialing[conn.peer]
        if conn.peer is not None and self.open.get(conn.peer) is conn:
            del self.open[conn.peer]
            self.stats["lost"] += 1
            self.needs_sync = True
            log.info("event=raftnet_disconnected peer=%s why=%r", conn.peer, why)
        elif not quiet:
            log.warning("event=raftnet_refused peer=%s why=%r", conn.peer or "?", why)

    def close(self) -> None:
        """Close every connection and the listener (again: nothing to do)."""
        if self.closed:
            return
        self.closed = True
        for conn in list(self.conns):
            self._close(conn, "shutting down", quiet=True)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(self.listener)
        self.listener.close()
        self.selector.close()

    def status(self) -> dict[str, Any]:
        """Endpoint, connected peers and counters; from any thread (racy reads, for status and metrics)."""
        return {"endpoint": self.endpoint, "encrypted": self.encrypt, "peers_connected": sorted(list(self.open)),
                **dict(self.stats)}

    # -- crypto ---------------------------------------------------------------------------------------------------
    def _transcript(self, nonce_d: bytes, nonce_a: bytes, dialer: str, acceptor: str) -> bytes:
        return _transcript(self.cluster, nonce_d, nonce_a, dialer, acceptor)

    def _mac(self, label: bytes, transcript: bytes) -> bytes:
        return _mac(self.key, label, transcript)


def _transcript(cluster: bytes, nonce_d: bytes, nonce_a: bytes, dialer: str, acceptor: str) -> bytes:
    return b"|".join((cluster, nonce_d, nonce_a, dialer.encode(), acceptor.encode()))


def _mac(key: bytes, label: bytes, transcript: bytes) -> bytes:
    return hmac.new(key, _DOMAIN + label + b"|" + transcript, hashlib.sha256).digest()


def probe(endpoint: str, *, cluster: str, key: bytes, encrypt: bool, timeout: float = 5.0,
          claim: str = "0.0.0.0:0") -> bool:
    """Whether the node listening on ``endpoint`` accepts ``key``: the handshake as a dialer claiming to be
    ``claim``, then one record (a heartbeat) from the node that opens under the derived key.

    False when the node proves a different key or drops us. Blocking; for tests and operators' checks.
    """
    host, port = endpoint.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        nonce_d = os.urandom(NONCE_BYTES)
        hello = MAGIC + nonce_d + _ids(claim, endpoint)
        sock.sendall(_LEN.pack(len(hello)) + hello)
        try:
            welcome = _recv_record(sock, HANDSHAKE_BYTES_MAX)
            if welcome is None or len(welcome) != len(MAGIC) + NONCE_BYTES + MAC_BYTES:
                return False
            nonce_a = welcome[len(MAGIC):len(MAGIC) + NONCE_BYTES]
            transcript = _transcript(cluster.encode(), nonce_d, nonce_a, claim, endpoint)
            if not hmac.compare_digest(welcome[len(MAGIC) + NONCE_BYTES:], _mac(key, b"acc", transcript)):
                return False
            proof = _mac(key, b"dial", transcript)
            sock.sendall(_LEN.pack(len(proof)) + proof)
            record = _recv_record(sock, RECORD_BYTES_MAX)
            if record is None:
                return False
            _Sealer(_mac(key, b"a2d", transcript) if encrypt else None).open(record)
            return True
        except (OSError, ValueError, InvalidTag):
            return False


def _recv_record(sock: socket.socket, limit: int) -> bytes | None:
    """One record, read blocking (``probe``); None if the peer closed first."""
    buf = b""
    while len(buf) < 4 or len(buf) < 4 + _LEN.unpack_from(buf)[0]:
        if len(buf) >= 4 and _LEN.unpack_from(buf)[0] > limit:
            raise ValueError("record too large")
        data = sock.recv(65536)
        if not data:
            return None
        buf += data
    return buf[4:4 + _LEN.unpack_from(buf)[0]]


def _ids(dialer: str, acceptor: str) -> bytes:
    a, b = dialer.encode(), acceptor.encode()
    if len(a) > ID_BYTES_MAX or len(b) > ID_BYTES_MAX:
        raise ValueError("endpoint id too long")
    return bytes([len(a)]) + a + bytes([len(b)]) + b


def _parse_ids(raw: bytes) -> tuple[str, str]:
    n = raw[0]
    dialer = raw[1:1 + n]
    m = raw[1 + n]
    acceptor = raw[2 + n:2 + n + m]
    if len(dialer) != n or len(acceptor) != m or len(raw) != 2 + n + m:
        raise ValueError("malformed HELLO")
    return dialer.decode(), acceptor.decode()


def _preferred(old: _Conn, new: _Conn, me: str, peer: str) -> _Conn:
    """Of two open connections to ``peer``, the one both ends keep: dialed by the larger endpoint, else newer."""
    larger_dials = me > peer  # True: the one we dialed is the right direction
    old_right = old.dialed == larger_dials
    new_right = new.dialed == larger_dials
    if old_right and not new_right:
        return old
    return new
