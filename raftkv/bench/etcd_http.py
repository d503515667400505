"""etcd's v3 HTTP/JSON gateway as the benchmark speaks it: request encoding, an incremental response parser
and one blocking call (readiness, leader lookup, failover probes).

A small HTTP/1.1 keep-alive client of our own rather than ``http.client`` because the load generator must
feed bytes from its ``selectors`` loop into a parser (``HttpReader``), which ``http.client`` cannot do.
"""

from __future__ import annotations

import base64
import json
import socket


class HttpReader:
    """Incremental HTTP/1.1 response parser (Content-Length or chunked): gets() -> (status, body) or False."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> None:
        self.buf += data

    def gets(self) -> tuple[int, bytes] | bool:
        buf = self.buf
        i = buf.find(b"\r\n\r\n")
        if i < 0:
            return False
        lines = bytes(buf[:i]).decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        start = i + 4
        if "content-length" in headers:
            end = start + int(headers["content-length"])
            if len(buf) < end:
                return False
            body = bytes(buf[start:end])
            del buf[:end]
            return status, body
        if headers.get("transfer-encoding", "").lower() == "chunked":
            pos, body_parts = start, []
            while True:
                j = buf.find(b"\r\n", pos)
                if j < 0:
                    return False
                size = int(bytes(buf[pos:j]).split(b";")[0], 16)
                if size == 0:
                    k = buf.find(b"\r\n", j + 2)  # trailers end with an empty line
                    if k < 0:
                        return False
                    del buf[:k + 2]
                    return status, b"".join(body_parts)
                if len(buf) < j + 2 + size + 2:
                    return False
                body_parts.append(bytes(buf[j + 2:j + 2 + size]))
                pos = j + 2 + size + 2
        del buf[:start]
        return status, b""


def http_request(host: str, port: int, path: str, body: dict) -> bytes:
    """A keep-alive ``POST`` of ``body`` as JSON."""
    data = json.dumps(body, separators=(",", ":")).encode()
    return (b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % (path.encode(), host.encode(), port, len(data))) + data


def b64(x: bytes) -> str:
    """Base64, as the gateway wants keys and values."""
    return base64.b64encode(x).decode()


def http_call(addr: tuple[str, int], path: str, body: dict, timeout: float = 2.0) -> tuple[int, dict]:
    """One request on a fresh connection: (HTTP status, decoded JSON body)."""
    with socket.create_connection(addr, timeout=timeout) as s:
        s.sendall(http_request(addr[0], addr[1], path, body))
        r = HttpReader()
        while (rep := r.gets()) is False:
            data = s.recv(65536)
            if not data:
                raise ConnectionError("closed")
            r.feed(data)
    status, raw = rep  # type: ignore[misc]
    try:
        return status, json.loads(raw or b"{}")
    except ValueError:
        return status, {"raw": raw.decode(errors="replace")}


def leader_index(statuses: list[tuple[int, int] | None]) -> int | None:
    """Which member leads, from each member's (own ID, leader's ID) or None where it did not answer."""
    ids = {st[0]: i for i, st in enumerate(statuses) if st}
    leaders = [st[1] for st in statuses if st and st[1]]
    return ids.get(leaders[-1]) if leaders else None


def find_leader(addrs: list[tuple[str, int]], timeout: float = 1.0) -> int | None:
    """The index in ``addrs`` of the member the others call leader (``/v3/maintenance/status``), or None."""
    statuses: list[tuple[int, int] | None] = []
    for addr in addrs:
        try:
            st, body = http_call(addr, "/v3/maintenance/status", {}, timeout=timeout)
        except OSError:
            st = 0
        # uint64 fields are strings in the gateway's JSON
        statuses.append((int(body["header"]["member_id"]), int(body.get("leader", 0))) if st == 200 else None)
    return leader_index(statuses)
