"""RESP2, the Redis wire protocol, as raftkv speaks it: pure encoding and framing.

Requests are RESP arrays of bulk strings (what every Redis client sends); they
are parsed by ``hiredis.Reader`` (C, maintained).  Replies are encoded here.

Python values map to RESP replies as follows: ``bytes`` -> bulk string,
``None`` -> nil bulk, ``int``/``bool`` -> integer, ``list``/``tuple`` -> array,
``Simple`` -> simple string, ``Error`` -> error, ``NIL_ARRAY`` -> nil array
(what EXEC answers when a watched key changed).  A client that says
``HELLO 3`` (redis-py 8 does by default) gets the same replies in RESP3
framing: nil as ``_`` and HELLO's reply as a map; raftkv sends no other RESP3
types.

Error replies start with a stable code (see ``ERROR_CODES``), then a message a
person can act on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import hiredis

# Stable error codes; clients dispatch on these, people read the message.
ERROR_CODES = {
    "ERR": "generic error: bad arguments, unknown command",
    "WRONGARGS": "wrong number of arguments",
    "TOOBIG": "a key, value or request is over the configured limit",
    "NOQUORUM": "the key's shard has no reachable leader right now; retry later",
    "TRYAGAIN": "the request was not applied (leader changed or overloaded); safe to retry",
    "UNKNOWN": "the outcome is unknown: the write may or may not have been applied",
    "MOVED": "this node does not lead the key's shard; the reply names the leader",
    "TXNCONFLICT": "a transaction conflicted with another one and was aborted; retry",
    "LOCKED": "the key is locked by an unresolved transaction; retry",
    "NOAUTH": "authentication required",
    "WRONGPASS": "invalid password",
    "BUSY": "the node is at a configured limit (connections, pipeline depth)",
    "PROTO": "malformed RESP frame; the connection is closed",
}


@dataclass(frozen=True)
class Simple:
    """A RESP simple string (``+OK``)."""

    text: str


@dataclass(frozen=True)
class Error:
    """A RESP error reply: ``-CODE message``."""

    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.code} {self.message}"


@dataclass(frozen=True)
class Raw:
    """A reply another node already encoded (RESP2); ``value`` is its decoded form."""

    data: bytes
    value: Any


class _NilArray:
    def __repr__(self) -> str:
        return "NIL_ARRAY"


NIL_ARRAY = _NilArray()
OK = Simple("OK")
PONG = Simple("PONG")
QUEUED = Simple("QUEUED")


@dataclass(frozen=True)
class Map:
    """A RESP3 map (HELLO's reply); sent as a flat array to RESP2 clients."""

    items: tuple


def encode(value: Any, resp3: bool = False) -> bytes:
    """Encode one reply; ``resp3`` for connections that said ``HELLO 3``."""
    out: list[bytes] = []
    _encode_into(value, out, resp3)
    return b"".join(out)


def _encode_into(v: Any, out: list[bytes], resp3: bool = False) -> None:
    if isinstance(v, bytes):
        out.append(b"$%d\r\n%s\r\n" % (len(v), v))
    elif v is None:
        out.append(b"_\r\n" if resp3 else b"$-1\r\n")
    elif isinstance(v, bool):
        out.append(b":1\r\n" if v else b":0\r\n")
    elif isinstance(v, int):
        out.append(b":%d\r\n" % v)
    elif isinstance(v, Simple):
        out.append(b"+%s\r\n" % _one_line(v.text))
    elif isinstance(v, Error):
        out.append(b"-%s %s\r\n" % (v.code.encode(), _one_line(v.message)))
    elif isinstance(v, (list, tuple)):
        out.append(b"*%d\r\n" % len(v))
        for item in v:
            _encode_into(item, out, resp3)
    elif isinstance(v, Raw):
        if resp3:
            _encode_into(v.value, out, resp3)
        else:
            out.append(v.data)
    elif isinstance(v, Map):
        out.append((b"%%%d\r\n" if resp3 else b"*%d\r\n") % (len(v.items) // (2 if resp3 else 1)))
        for item in v.items:
            _encode_into(item, out, resp3)
    elif v is NIL_ARRAY:
        out.append(b"_\r\n" if resp3 else b"*-1\r\n")
    elif isinstance(v, str):
        _encode_into(v.encode(), out, resp3)
    else:
        raise TypeError(f"cannot encode {type(v).__name__} as RESP")


def _one_line(text: str) -> bytes:
    return text.replace("\r", " ").replace("\n", " ").encode()


def encode_command(*args: bytes | str | int) -> bytes:
    """Encode a request (array of bulk strings), as a client sends it."""
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, str):
            a = a.encode()
        elif isinstance(a, int):
            a = str(a).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(parts)


class ProtocolError(Exception):
    """The peer sent bytes that are not RESP; the stream cannot be resynchronised."""


class RequestTooBig(Exception):
    """One request exceeded ``request_bytes_max``."""


class RequestParser:
    """Incremental request framing with a size limit per request.

    ``feed(data)`` then ``requests()`` yields complete commands as lists of bytes.
    Raises ``ProtocolError`` on garbage and ``RequestTooBig`` when the bytes
    buffered towards one request exceed ``request_bytes_max`` (checked before
    the whole oversize request is buffered).
    """

    def __init__(self, request_bytes_max: int) -> None:
        self._reader = hiredis.Reader()
        self._limit = request_bytes_max
        self._pending = 0  # bytes fed since the last complete request
        self._broken: ProtocolError | None = None

    @property
    def broken(self) -> ProtocolError | None:
        """The framing error met after the requests last returned, if any."""
        return self._broken

    def feed(self, data: bytes) -> None:
        self._pending += len(data)
        self._reader.feed(data)

    def requests(self) -> list[list[bytes]]:
        # Requests before a garbage frame are still served; the error comes next call.
        if self._broken is not None:
            raise self._broken
        out = []
        while True:
            try:
                req = self._reader.gets()
                if req is False:
                    break
                if not isinstance(req, list) or not req or not all(isinstance(a, bytes) for a in req):
                    raise ProtocolError("expected an array of bulk strings")
            except (hiredis.ProtocolError, ProtocolError) as e:
                self._broken = ProtocolError(str(e))
                if out:
                    return out
                raise self._broken from None
            out.append(req)
        if out:
            # What is still buffered belongs to the next request: at most one read's worth.
            self._pending = 0
        if self._pending > self._limit:
            raise RequestTooBig(f"request exceeds {self._limit} bytes (request_bytes_max)")
        return out


class ReplyError(Exception):
    """An error reply received from a node: ``code`` and ``message``."""

    def __init__(self, text: str) -> None:
        code, _, message = text.partition(" ")
        super().__init__(text)
        self.code = code
        self.message = message


def decode_reply(data: bytes) -> Any:
    """Decode one complete encoded reply."""
    r = reply_reader()
    r.feed(data)
    v = r.gets()
    if v is False:
        raise ProtocolError("incomplete reply")
    return v


def reply_reader() -> hiredis.Reader:
    """A reader for replies (client side): errors become ``ReplyError`` values."""
    return hiredis.Reader(replyError=ReplyError)
