"""One blocking RESP connection to one node: the client side of ``raftkv.protocol``.

Everything in the project that sends a command and waits for its reply on a
plain socket uses this class: ``raftkv.Client`` (its transport), the local
cluster manager's readiness and status calls, the membership operator, the
Jepsen-style harness's pinned-node reads and the benchmark's control calls and
preload.  The benchmark's load generator is the one exception: it multiplexes
many connections over one ``selectors`` loop and never blocks on a reply.

Contract
--------
* ``call(*args)`` sends one command and returns its decoded reply.  An error
  reply is **returned** as a :class:`raftkv.protocol.ReplyError` value, never
  raised: callers decide whether ``MOVED`` or ``NOQUORUM`` is a failure, and a
  ``pipeline`` can hold errors next to successes.
* Transport failures raise ``OSError`` (``ConnectionError`` when the node
  closes the connection, ``TimeoutError`` when a reply does not come within
  the timeout).  A failed call **closes the connection**: a reply that arrives
  late would otherwise be taken for the answer to the next command.  Make a
  new ``Connection`` to try again.
* Credentials, when given, are sent with ``AUTH`` right after connecting; a
  refused ``AUTH`` closes the connection and raises the ``ReplyError``
  (nothing useful can be done on an unauthenticated connection).

Concurrency: a ``Connection`` has one request (or one pipeline) in flight and
is not thread-safe; give each thread its own (``raftkv.Client`` does).
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterable, Sequence
from typing import Any

import hiredis

from raftkv import protocol

Arg = bytes | str | int

# One recv() reads at most this much; replies larger than it take several reads.
RECV_BYTES_MAX = 262144


class Connection:
    """A blocking RESP connection to ``host:port``.

    ``timeout`` (seconds) bounds the connect, the ``AUTH`` and, unless a call
    gives its own, each call.  ``tls`` wraps the socket in that context (the
    host name is sent for SNI).  ``auth`` is what ``AUTH`` takes:
    ``(password,)`` or ``(username, password)``.
    """

    def __init__(self, host: str, port: int, timeout: float = 2.0, tls: ssl.SSLContext | None = None,
                 auth: Sequence[bytes | str] | None = None) -> None:
        self.addr = (host, port)
        self.timeout = timeout
        raw = socket.create_connection(self.addr, timeout=timeout)
        try:
            # Requests are small and each waits for its reply: Nagle would only add delay.
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock: socket.socket | None = (tls.wrap_socket(raw, server_hostname=host)
                                                if tls is not None else raw)
        except OSError:
            raw.close()
            raise
        self._reader = protocol.reply_reader()
        if auth:
            reply = self.call(b"AUTH", *auth)
            if isinstance(reply, protocol.ReplyError):
                self.close()
                raise reply

    @property
    def closed(self) -> bool:
        """True once ``close()`` ran or a call failed."""
        return self._sock is None

    def call(self, *args: Arg, timeout: float | None = None) -> Any:
        """Send one command; its reply (an error reply as a ``ReplyError`` value)."""
        return self._exchange(protocol.encode_command(*args), 1, timeout)[0]

    def pipeline(self, commands: Iterable[Sequence[Arg]], timeout: float | None = None) -> list[Any]:
        """Send every command in one write, then read one reply per command, in order.

        ``timeout`` bounds each wait for more bytes, not the whole pipeline.
        """
        payload = [protocol.encode_command(*c) for c in commands]
        return self._exchange(b"".join(payload), len(payload), timeout)

    def _exchange(self, payload: bytes, n_replies: int, timeout: float | None) -> list[Any]:
        sock = self._sock
        if sock is None:
            raise ConnectionError(f"connection to {self.addr[0]}:{self.addr[1]} is closed")
        replies: list[Any] = []
        try:
            sock.settimeout(self.timeout if timeout is None else timeout)
            sock.sendall(payload)
            while len(replies) < n_replies:
                reply = self._reader.gets()
                if reply is not False:
                    replies.append(reply)
                    continue
                data = sock.recv(RECV_BYTES_MAX)
                if not data:
                    raise ConnectionError("connection closed by node")
                self._reader.feed(data)
        except OSError:
            self.close()
            raise
        except hiredis.ProtocolError as e:
            self.close()
            raise protocol.ProtocolError(f"malformed reply from {self.addr[0]}:{self.addr[1]}: {e}") from None
        return replies

    def close(self) -> None:
        """Close the socket (idempotent)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
