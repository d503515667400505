"""``raftkv.connection.Connection`` against a scripted server: the reply contract, pipelining, AUTH, closing."""

from __future__ import annotations

import socket
import threading

import pytest

from raftkv import protocol
from raftkv.connection import Connection


def _serve(replies: dict[bytes, bytes]) -> tuple[tuple[str, int], threading.Thread]:
    """One-connection server: each request's first word picks a canned reply; ``CLOSE`` hangs up."""
    srv = socket.create_server(("127.0.0.1", 0))

    def run() -> None:
        conn, _ = srv.accept()
        parser = protocol.RequestParser(1 << 20)
        with conn, srv:
            while data := conn.recv(65536):
                parser.feed(data)
                for req in parser.requests():
                    if req[0] == b"CLOSE":
                        return
                    conn.sendall(replies[req[0]])

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return srv.getsockname(), t


def test_error_replies_are_values_and_pipeline_keeps_order() -> None:
    addr, _ = _serve({b"GET": b"$1\r\nv\r\n", b"SET": b"+OK\r\n", b"BAD": b"-MOVED 3 n2\r\n"})
    with Connection(*addr, timeout=2.0) as c:
        assert c.call("GET", "k") == b"v"
        err = c.call("BAD")
        assert isinstance(err, protocol.ReplyError) and err.code == "MOVED"
        replies = c.pipeline([("SET", "a", 1), ("BAD",), ("GET", "a")])
        assert replies[0] == b"OK" and isinstance(replies[1], protocol.ReplyError) and replies[2] == b"v"
    assert c.closed


def test_refused_auth_raises_and_closes() -> None:
    addr, _ = _serve({b"AUTH": b"-WRONGPASS invalid password\r\n"})
    with pytest.raises(protocol.ReplyError) as e:
        Connection(*addr, timeout=2.0, auth=["pw"])
    assert e.value.code == "WRONGPASS"


def test_a_failed_call_closes_the_connection() -> None:
    addr, _ = _serve({b"GET": b"$1\r\nv\r\n"})
    c = Connection(*addr, timeout=2.0)
    with pytest.raises(ConnectionError):
        c.call("CLOSE")
    assert c.closed
    with pytest.raises(ConnectionError):
        c.call("GET", "k")
