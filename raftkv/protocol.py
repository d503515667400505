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
    "MOVING": "the key is being moved to a new shard (raftkv shard add); not applied, retry",
    "WRONGSHARD": "the key now belongs to another shard (`-WRONGSHARD epoch shard ...`); not applied: refresh "
                  "the map (RAFTKV.CLUSTER) and retry",
    "RINGCHANGED": "RAFTKV.TXN ... RING tag: the cluster's ring is not the one the transaction was planned under "
                   "(a shard was added or removed); this request was not run: plan it again with a new id "
                   "(if an earlier send of the same id may have run, its outcome is unknown)",
    "MAPCHANGED": "RAFTKV.MAPCAS: the cluster's shard map is at another epoch (`-MAPCHANGED epoch ...`): another "
                  "command changed it; nothing was changed: re-read the map and retry",
    "SHARDMOVE": "RAFTKV.BACKUP: a shard move (raftkv shard add|remove) is under way on the shard, or started or "
                 "ended during the backup; nothing was written: run the backup again after the move",
    "TXNCONFLICT": "a transaction conflicted with another one and was aborted; retry",
    "LOCKED": "the key is locked by an unresolved transaction; retry",
    "NOLEASE": "the lease does not exist: never granted, expired or revoked (its keys are gone)",
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


ARGS_MAX = 1024 * 1024  # like Redis: a multibulk length above this is a protocol error
_HEADER_BYTES_MAX = 32  # b"*" or b"$", up to 20 digits, CRLF; longer is garbage


class RequestParser:
    """Incremental request framing with limits checked at each header.

    ``feed(data)`` then ``requests()`` yields complete commands as lists of bytes.

    Every array and bulk header is checked *as it is read*, before the bytes it
    announces are awaited or allocated (Redis does the same): a multibulk length
    above ``args_max`` or a malformed header is a ``ProtocolError``; a bulk, or a
    request's declared total, above ``request_bytes_max`` is ``RequestTooBig``.
    ``hiredis`` still does the parsing, but only of bytes that passed this scan,
    so a declared length of 2**31 never reaches it.  Empty and nil arrays
    (``*0``, ``*-1``) are skipped, as Redis does.
    """

    def __init__(self, request_bytes_max: int, args_max: int = ARGS_MAX) -> None:
        self._reader = hiredis.Reader()
        self._limit = request_bytes_max
        self._args_max = args_max
        self._line = b""  # a header split across reads
        self._args_left = 0  # bulk headers still due in the current array
        self._skip = 0  # bytes of the current bulk (and its CRLF) still due
        self._declared = 0  # bytes declared so far by the current request
        self._error: ProtocolError | RequestTooBig | None = None  # raised after what preceded it

    @property
    def broken(self) -> ProtocolError | RequestTooBig | None:
        """The error met after the requests last returned, if any: the connection must close."""
        return self._error  # type: ignore[return-value]

    def feed(self, data: bytes) -> None:
        if self._error is not None:
            return
        good = self._scan(data)
        if good:
            self._reader.feed(data if good == len(data) else data[:good])

    def _scan(self, data: bytes) -> int:
        """Walk the frame headers in ``data``; return how many leading bytes are acceptable."""
        pos, n = 0, len(data)
        while pos < n:
            if self._skip:
                step = min(self._skip, n - pos)
                self._skip -= step
                pos += step
                continue
            if not self._line and data[pos:pos + 1] != (b"*" if self._args_left == 0 else b"$"):
                return self._fail(self._unexpected(data[pos:pos + 1]), pos)
            room = _HEADER_BYTES_MAX - len(self._line)
            end = data.find(b"\n", pos, pos + room)
            if end < 0:
                if n - pos >= room:
                    return self._fail(ProtocolError("header line too long"), pos)
                self._line += data[pos:]
                return n
            line = self._line + data[pos:end + 1]
            start = pos
            self._line = b""
            pos = end + 1
            err = self._header(line)
            if err is not None:
                return self._fail(err, start)
        return n

    def _header(self, line: bytes) -> Exception | None:
        kind = line[:1]
        array = self._args_left == 0
        if kind != (b"*" if array else b"$"):
            return self._unexpected(kind)
        what = "multibulk" if array else "bulk"
        if len(line) < 4 or line[-2:] != b"\r\n":
            return ProtocolError(f"invalid {what} length")
        try:
            value = int(line[1:-2])
        except ValueError:
            return ProtocolError(f"invalid {what} length")
        if array:
            if value > self._args_max:
                return ProtocolError(f"invalid multibulk length {value} (args_max={self._args_max})")
            self._args_left = max(0, value)
            self._declared = 0
            return None
        if value < 0:
            return ProtocolError("invalid bulk length")
        self._declared += value
        if self._declared > self._limit:
            return RequestTooBig(f"request exceeds {self._limit} bytes (request_bytes_max), by its declared lengths")
        self._args_left -= 1
        self._skip = value + 2
        return None

    def _unexpected(self, kind: bytes) -> ProtocolError:
        if self._args_left == 0:
            return ProtocolError(f"expected * (an array of bulk strings), got {kind!r}")
        return ProtocolError(f"expected $ (a bulk string), got {kind!r}")

    def _fail(self, err: ProtocolError | RequestTooBig, good: int) -> int:
        self._error = err
        return good

    def requests(self) -> list[list[bytes]]:
        # Requests before a bad header are still served; the error comes next call.
        out = []
        while True:
            try:
                req = self._reader.gets()
            except hiredis.ProtocolError as e:  # the scan should have caught it; never serve past it
                self._error = ProtocolError(str(e))
                break
            if req is False:
                break
            if not req:  # *0 or *-1: nothing to run
                continue
            if not isinstance(req, list) or not all(isinstance(a, bytes) for a in req):
                self._error = ProtocolError("expected an array of bulk strings")
                break
            out.append(req)
        if not out and self._error is not None:
            raise self._error
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
