"""What replicated writes cost in bare Python on this machine: the floor beneath raftkv's put figures.

    .venv/bin/python bench/floor.py [--clients 1,32] [--seconds 5] [--store lmdb,file]

Three processes on loopback play a leader and two followers with none of raftkv's layers: no Raft terms or
elections, no RESP, no state machine, no asyncio. The leader (one thread, one ``selectors`` loop) reads every
request that has arrived, sends them as one batch to both followers, commits the batch to its own store, and
answers the batch once one follower acknowledged it (its own commit plus one follower: a majority of three).
Each follower commits every batch it received, then acknowledges. Commits are durable: ``--store lmdb`` is an
LMDB write transaction with ``sync`` on (what raftkv's engine does: data pages, then the meta page), ``--store
file`` an append to a plain file and one ``fdatasync`` (a write-ahead log's best case). A separate process
runs N closed-loop clients (one request of 120 bytes in flight each) and prints puts per second and, at one
client, the latency percentiles.

What it shows: how far a Python program can go on this disk and these CPUs, so that raftkv's own figures
(and etcd's, measured on the same machine) can be read against it. It is not a store: nothing here survives
a leader's failure or checks anything it receives.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import selectors
import shutil
import socket
import struct
import sys
import tempfile
import time

_LEN = struct.Struct(">I")
BODY = b"x" * 120


class _Log:
    """A durable append-only sequence of batches: LMDB (sync on) or a file with one fdatasync per append."""

    def __init__(self, path: str, kind: str) -> None:
        self.kind = kind
        self.index = 0
        if kind == "lmdb":
            import lmdb
            self.env = lmdb.open(path, map_size=1 << 32, sync=True, metasync=True)
        else:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND)

    def append(self, batches: list[bytes]) -> None:
        if self.kind == "lmdb":
            with self.env.begin(write=True) as txn:
                for b in batches:
                    self.index += 1
                    txn.put(self.index.to_bytes(8, "big"), b)
        else:
            os.write(self.fd, b"".join(_LEN.pack(len(b)) + b for b in batches))
            os.fdatasync(self.fd)


def _frames(buf: bytearray) -> list[bytes]:
    """Take every complete length-prefixed frame off the front of ``buf``."""
    out = []
    while len(buf) >= 4:
        (n,) = _LEN.unpack_from(buf)
        if len(buf) < 4 + n:
            break
        out.append(bytes(buf[4:4 + n]))
        del buf[:4 + n]
    return out


def _listen(port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(128)
    return s


def _dial(port: int) -> socket.socket:
    deadline = time.monotonic() + 10
    while True:
        try:
            s = socket.create_connection(("127.0.0.1", port))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return s
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def follower(port: int, path: str, kind: str) -> None:
    """Commit every batch received, then acknowledge each with one byte."""
    log = _Log(path, kind)
    ls = _listen(port)
    s, _ = ls.accept()
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray()
    while True:
        try:
            data = s.recv(1 << 20)
        except ConnectionError:
            return
        if not data:
            return
        buf += data
        batches = _frames(buf)
        if batches:
            log.append(batches)
            s.sendall(b"a" * len(batches))


def leader(port: int, followers: list[int], path: str, kind: str, clients: int) -> None:
    """Batch what arrived, replicate, commit, answer on a majority (see module doc)."""
    log = _Log(path, kind)
    ls = _listen(port)
    links = [_dial(p) for p in followers]
    sel = selectors.DefaultSelector()
    conns = []
    for _ in range(clients):
        c, _ = ls.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.setblocking(False)
        conns.append(c)
        sel.register(c, selectors.EVENT_READ, bytearray())
    for f in links:
        f.setblocking(False)
        sel.register(f, selectors.EVENT_READ, None)
    acked = dict.fromkeys(links, 0)
    waiting: list[list[socket.socket]] = []  # the clients of each batch not yet answered, oldest first
    sent = answered = 0
    while True:
        arrived: list[tuple[socket.socket, bytes]] = []
        for key, _ in sel.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if key.data is None:
                acked[sock] += len(sock.recv(65536))
                continue
            try:
                data = sock.recv(65536)
            except ConnectionError:
                return
            if not data:
                return
            key.data.extend(data)
            arrived.extend((sock, f) for f in _frames(key.data))
        if arrived:
            batch = b"".join(f for _, f in arrived)
            record = _LEN.pack(len(batch)) + batch
            for f in links:
                f.sendall(record)
            log.append([batch])
            sent += 1
            waiting.append([c for c, _ in arrived])
        while answered < min(max(acked.values()), sent):
            for c in waiting.pop(0):
                c.send(b"+OK\r\n")
            answered += 1


def load(port: int, clients: int, seconds: float, out: mp.Queue) -> None:
    """Closed-loop clients: each sends its next request when the previous one is answered."""
    socks = [_dial(port) for _ in range(clients)]
    sel = selectors.DefaultSelector()
    request = _LEN.pack(len(BODY)) + BODY
    sent_at = {}
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
        sent_at[s] = time.perf_counter()
        s.sendall(request)
    lat: list[float] = []
    t0 = time.perf_counter()
    end = t0 + seconds
    while time.perf_counter() < end:
        for key, _ in sel.select(0.1):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            for _ in range(s.recv(65536).count(b"\n")):
                now = time.perf_counter()
                lat.append(now - sent_at[s])
                sent_at[s] = now
                s.sendall(request)
    out.put((len(lat) / (time.perf_counter() - t0), sorted(lat)))


def run(kind: str, clients: int, seconds: float, ports: list[int], directory: str | None = None,
        ) -> tuple[float, list[float]]:
    """Puts per second and the sorted latencies (s) of one leader, two followers and ``clients`` clients;
    ``ports``: the leader's and the followers' (three), ``directory``: where the stores go (default: the
    repository, on the disk a node's data directory would be on)."""
    root = directory or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    d = tempfile.mkdtemp(prefix="raftkv-floor-", dir=root)
    procs = [mp.Process(target=follower, args=(ports[i], os.path.join(d, f"f{i}"), kind)) for i in (1, 2)]
    procs.append(mp.Process(target=leader, args=(ports[0], ports[1:3], os.path.join(d, "l"), kind, clients)))
    for p in procs:
        p.start()
    out: mp.Queue = mp.Queue()
    gen = mp.Process(target=load, args=(ports[0], clients, seconds, out))
    gen.start()
    try:
        return out.get(timeout=seconds + 30)
    finally:
        gen.join(5)
        for p in procs:
            p.terminate()
            p.join(5)
        shutil.rmtree(d, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="1,32", help="comma list of client counts")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--store", default="lmdb,file", help="comma list of lmdb, file")
    ap.add_argument("--base-port", type=int, default=27100)
    a = ap.parse_args(argv)
    for kind in a.store.split(","):
        for clients in (int(c) for c in a.clients.split(",")):
            rate, lat = run(kind, clients, a.seconds, [a.base_port, a.base_port + 1, a.base_port + 2])
            pct = {p: 1000 * lat[min(len(lat) - 1, int(len(lat) * p / 100))] for p in (50, 99)} if lat else {}
            print(f"{kind:5s} clients {clients:3d}: {rate:8.0f} puts/s  p50 {pct.get(50, 0):.3f} ms  "
                  f"p99 {pct.get(99, 0):.3f} ms", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
