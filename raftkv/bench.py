"""raftkv benchmark suite: a multi-process closed-loop load generator and side-by-side peers.

Theory of operation
-------------------
``run_suite`` brings up a fresh local raftkv cluster (3 nodes, ``shards`` shards,
durable, linearizable), and, when their binaries are on PATH, an etcd 3.4
cluster (3 members on loopback, driven through its v3 HTTP/JSON gateway) and a
single Redis (``appendonly yes``, ``appendfsync always``: the unreplicated
ceiling).  Systems run one after the other, never at the same time, so they do
not share the CPU.  Each is preloaded with the key space, then driven by the
same load generator for every (workload, concurrency) point.

The load generator is closed-loop: N virtual clients, each with one request in
flight.  They are spread over several worker processes (``procs``; default: the
number of CPUs, capped by N), and each process runs one ``selectors`` event loop
over raw sockets, so one Python process never has to run 32 threads.  raftkv is
spoken to exactly as ``raftkv.Client`` does: writes are session-wrapped
(``RAFTKV.REQ sid seq ...``, de-duplicated), every command goes to the shard's
leader as learned from ``RAFTKV.SHARDS`` (a stale guess costs a forward, an error
reply triggers a refresh).  ``via="client"`` drives raftkv through
``raftkv.Client`` in threads instead.  Latencies go into log-bucketed (about 1 %
wide, HDR-like) histograms per process, merged by the parent.  Only requests
sent and answered inside the measured window (after ``warmup``) count.

Nothing here runs at import.  Nothing is installed: peers missing from PATH are
reported as skipped.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import itertools
import json
import math
import multiprocessing as mp
import os
import platform
import random
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import hiredis

from raftkv import protocol

WORKLOADS = ("put", "get", "stale_get", "mix", "cas", "mset2", "mset4", "txn")
TXN_WORKLOADS = ("mset2", "mset4", "txn")
WRITES = {"put", "cas", "mset2", "mset4", "txn"}
ALL_PEERS = ("etcd", "redis")
_RETRY_CODES = {"MOVED", "TRYAGAIN", "NOQUORUM", "UNKNOWN", "LOCKED", "BUSY"}


# -- histogram ---------------------------------------------------------------------------------------------


class Hist:
    """Log-bucketed latency histogram: bucket i holds latencies in [e^(i/100), e^((i+1)/100)) microseconds."""

    SCALE = 100.0

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.n = 0

    def record(self, seconds: float) -> None:
        us = seconds * 1e6
        i = int(math.log(us) * self.SCALE) if us > 1.0 else 0
        self.counts[i] = self.counts.get(i, 0) + 1
        self.n += 1

    def merge(self, other: Hist) -> None:
        for i, c in other.counts.items():
            self.counts[i] = self.counts.get(i, 0) + c
        self.n += other.n

    def quantile(self, q: float) -> float | None:
        """Latency in milliseconds at quantile ``q`` (bucket midpoint), None when empty."""
        if not self.n:
            return None
        rank = max(1, math.ceil(q * self.n))
        seen = 0
        for i in sorted(self.counts):
            seen += self.counts[i]
            if seen >= rank:
                return math.exp((i + 0.5) / self.SCALE) / 1000.0
        return None

    def to_dict(self) -> dict:
        return {"n": self.n, "counts": {str(k): v for k, v in self.counts.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> Hist:
        h = cls()
        h.counts = {int(k): v for k, v in d["counts"].items()}
        h.n = d["n"]
        return h


# -- keys and values ---------------------------------------------------------------------------------------


def key_name(i: int) -> bytes:
    return b"key:%012d" % i


def make_value(size: int) -> bytes:
    return (b"raftkv-bench-value-0123456789abcdefghijklmnopqrstuvwxyz" * (size // 50 + 1))[:size]


class KeyGen:
    """Uniform or zipfian (s=0.99, ranks scattered over the key space) key indexes."""

    def __init__(self, keyspace: int, dist: str = "uniform", seed: int | None = None) -> None:
        self.n = keyspace
        self.rng = random.Random(seed)
        self.dist = dist
        if dist == "zipf":
            cum, total = [], 0.0
            for r in range(1, keyspace + 1):
                total += 1.0 / r ** 0.99
                cum.append(total)
            self.cum, self.total = cum, total
        elif dist != "uniform":
            raise ValueError(f"unknown key distribution {dist!r}; use uniform or zipf")

    def next(self) -> int:
        if self.dist == "uniform":
            return self.rng.randrange(self.n)
        rank = bisect.bisect_left(self.cum, self.rng.random() * self.total)
        return (min(rank, self.n - 1) * 2654435761) % self.n


# -- wire protocols --------------------------------------------------------------------------------------


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
    data = json.dumps(body, separators=(",", ":")).encode()
    return (b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % (path.encode(), host.encode(), port, len(data))) + data


def b64(x: bytes) -> str:
    return base64.b64encode(x).decode()


def resp_call(addr: tuple[str, int], *args: bytes | str, timeout: float = 2.0) -> Any:
    with socket.create_connection(addr, timeout=timeout) as s:
        s.sendall(protocol.encode_command(*args))
        r = protocol.reply_reader()
        while (rep := r.gets()) is False:
            data = s.recv(65536)
            if not data:
                raise ConnectionError("closed")
            r.feed(data)
        return rep


def http_call(addr: tuple[str, int], path: str, body: dict, timeout: float = 2.0) -> tuple[int, dict]:
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


# -- feature detection -------------------------------------------------------------------------------------


def txn_support() -> dict[str, bool]:
    """Which transaction workloads this build of raftkv offers (MSET across shards, RAFTKV.TXN)."""
    try:
        from raftkv import node
        commands = node.COMMANDS
    except Exception:  # noqa: BLE001 - a half-edited node.py must not break the benchmark
        commands = {}
    mset = b"MSET" in commands
    txn = b"RAFTKV.TXN" in commands
    return {"mset2": mset, "mset4": mset, "txn": txn}


def found_peers(wanted: list[str]) -> tuple[list[str], dict[str, str]]:
    """(peers whose binaries are on PATH, {peer: reason skipped})."""
    found, skipped = [], {}
    for p in wanted:
        binary = {"etcd": "etcd", "redis": "redis-server"}.get(p)
        if binary is None:
            skipped[p] = "unknown peer"
        elif shutil.which(binary) is None:
            skipped[p] = f"'{binary}' not on PATH (Debian: apt-get install {'etcd-server' if p == 'etcd' else 'redis-server'})"
        else:
            found.append(p)
    return found, skipped


# -- systems under test ------------------------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def proc_cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def proc_rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


class System:
    """A running system under test; ``spec()`` is the picklable description workers connect with."""

    name = "?"

    def spec(self) -> dict:
        raise NotImplementedError

    def pids(self) -> list[int]:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def description(self) -> str:
        return self.name


class RaftKVSystem(System):
    name = "raftkv"

    def __init__(self, directory: str, shards: int = 3, nodes: int = 3) -> None:
        from raftkv.cluster import LocalCluster

        self.lc = LocalCluster.create(directory, nodes=nodes, shards=shards)
        self.lc.start()
        try:
            self.lc.wait_ready(60)
        except Exception:
            self.lc.stop()
            raise
        self.shards = shards

    def spec(self) -> dict:
        return {"kind": "raftkv", "config": str(self.lc.config),
                "nodes": {n: list(i.client_addr) for n, i in self.lc.map.nodes.items()}}

    def pids(self) -> list[int]:
        return [p for n in self.lc.map.nodes if (p := self.lc.pid(n)) is not None]

    def node_pids(self) -> dict[str, int | None]:
        return {n: self.lc.pid(n) for n in self.lc.map.nodes}

    def stop(self) -> None:
        self.lc.stop()

    def description(self) -> str:
        return (f"raftkv: {len(self.lc.map.nodes)} nodes, {self.shards} shards, replication "
                f"{self.lc.map.replication}, journal on disk, linearizable reads by ReadIndex")


class RedisSystem(System):
    name = "redis"

    def __init__(self, directory: str) -> None:
        self.dir = directory
        (self.port,) = free_ports(1)
        self.log = open(os.path.join(directory, "redis.log"), "ab")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", directory,
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no",
             "--protected-mode", "no"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10
        while True:
            try:
                if resp_call(("127.0.0.1", self.port), "PING", timeout=0.5) == b"PONG":
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"redis-server did not start (see {directory}/redis.log)")
            time.sleep(0.05)
        version = resp_call(("127.0.0.1", self.port), "INFO", "server")
        self.version = next((ln.split(":", 1)[1] for ln in version.decode().splitlines()
                             if ln.startswith("redis_version:")), "?")

    def spec(self) -> dict:
        return {"kind": "redis", "addr": ["127.0.0.1", self.port]}

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc.poll() is None else []

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def description(self) -> str:
        return f"redis {self.version}: 1 node, appendonly yes, appendfsync always (unreplicated ceiling)"


class EtcdSystem(System):
    name = "etcd"

    def __init__(self, directory: str, members: int = 3) -> None:
        self.dir = directory
        ports = free_ports(2 * members)
        self.names = [f"e{i + 1}" for i in range(members)]
        self.client_ports = dict(zip(self.names, ports[:members], strict=True))
        self.peer_ports = dict(zip(self.names, ports[members:], strict=True))
        self.initial = ",".join(f"{n}=http://127.0.0.1:{self.peer_ports[n]}" for n in self.names)
        self.procs: dict[str, subprocess.Popen] = {}
        for n in self.names:
            self.start_member(n)
        try:
            self.wait_ready(30)
        except Exception:
            self.stop()
            raise
        out = subprocess.run(["etcd", "--version"], capture_output=True, text=True).stdout.split()
        self.version = out[2] if len(out) > 2 else "?"

    def addr(self, n: str) -> tuple[str, int]:
        return ("127.0.0.1", self.client_ports[n])

    def start_member(self, n: str) -> None:
        log = open(os.path.join(self.dir, f"{n}.log"), "ab")
        self.procs[n] = subprocess.Popen(
            ["etcd", "--name", n, "--data-dir", os.path.join(self.dir, n),
             "--listen-client-urls", f"http://127.0.0.1:{self.client_ports[n]}",
             "--advertise-client-urls", f"http://127.0.0.1:{self.client_ports[n]}",
             "--listen-peer-urls", f"http://127.0.0.1:{self.peer_ports[n]}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_ports[n]}",
             "--initial-cluster", self.initial, "--initial-cluster-state", "new",
             "--initial-cluster-token", "raftkv-bench", "--logger", "zap", "--log-level", "warn"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    def kill_member(self, n: str) -> None:
        p = self.procs[n]
        p.send_signal(signal.SIGKILL)
        p.wait()

    def wait_ready(self, timeout: float, members: list[str] | None = None) -> None:
        deadline = time.monotonic() + timeout
        for n in members or self.names:
            while True:
                try:
                    st, _ = http_call(self.addr(n), "/v3/kv/range", {"key": b64(b"__probe")}, timeout=1.0)
                    if st == 200:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"etcd member {n} not ready after {timeout:.0f} s (see {self.dir}/{n}.log)")
                time.sleep(0.1)

    def leader(self) -> str | None:
        ids = {}
        leader_id = None
        for n in self.names:
            if self.procs[n].poll() is not None:
                continue
            try:
                st, body = http_call(self.addr(n), "/v3/maintenance/status", {}, timeout=1.0)
            except OSError:
                continue
            if st == 200:
                ids[body["header"]["member_id"]] = n
                leader_id = body.get("leader", leader_id)
        return ids.get(leader_id)

    def spec(self) -> dict:
        return {"kind": "etcd", "addrs": [list(self.addr(n)) for n in self.names]}

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs.values() if p.poll() is None]

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def description(self) -> str:
        return (f"etcd {self.version}: {len(self.names)} members on loopback, default heartbeat/election, WAL fsync, "
                "v3 HTTP/JSON gateway (linearizable range; serializable for stale_get)")


# -- the load generator: one event loop per worker process ------------------------------------------------------


@dataclass
class LoadParams:
    workload: str
    clients: int
    duration: float
    warmup: float = 1.0
    keyspace: int = 10_000
    value_size: int = 100
    dist: str = "uniform"
    procs: int = 0  # 0: min(clients, cpu count)
    op_timeout: float = 10.0
    via: str = "raw"  # raw sockets, or "client" (raftkv.Client in threads; raftkv only)
    seed: int = 0


@dataclass
class Result:
    system: str
    workload: str
    clients: int
    ops: int
    seconds: float
    ops_s: float
    p50_ms: float | None
    p99_ms: float | None
    p999_ms: float | None
    errors: int
    indeterminate: int
    error_codes: dict = field(default_factory=dict)
    generator: dict = field(default_factory=dict)
    txn_retries: int = 0  # transactions resent after TXNCONFLICT/TRYAGAIN (inside one measured op)
    server_cpu: float | None = None  # CPU-seconds of the server processes per wall second in the window
    hist: dict | None = None

    def row(self) -> dict:
        d = asdict(self)
        d.pop("hist")
        return d


class _Conn:
    __slots__ = ("sock", "reader", "vc", "key")

    def __init__(self, addr: tuple[str, int], vc: _VClient, http: bool) -> None:
        self.sock = socket.create_connection(addr, timeout=1.0)
        self.sock.settimeout(None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader: Any = HttpReader() if http else hiredis.Reader(replyError=protocol.ReplyError)
        self.vc = vc
        self.key = addr


class _VClient:
    """One closed-loop virtual client: at most one request in flight."""

    def __init__(self, w: _Worker, idx: int) -> None:
        self.w = w
        self.idx = idx
        self.conns: dict[Any, _Conn] = {}
        self.sent = 0.0
        self.inflight: _Conn | None = None
        self.is_write = False
        self.ctx: Any = None
        self.sid = f"bench-{uuid.uuid4().hex[:12]}-{idx}".encode()
        self.seq = 0
        self.txn_args: list[bytes] | None = None  # the transaction being retried (TXNCONFLICT/TRYAGAIN)
        self.retries = 0
        self.op = ""

    def conn(self, addr: tuple[str, int]) -> _Conn:
        c = self.conns.get(addr)
        if c is None:
            c = self.conns[addr] = _Conn(addr, self, self.w.kind == "etcd")
            self.w.sel.register(c.sock, selectors.EVENT_READ, c)
        return c

    def drop(self, c: _Conn) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.w.sel.unregister(c.sock)
        with contextlib.suppress(OSError):
            c.sock.close()
        self.conns.pop(c.key, None)
        if self.inflight is c:
            self.inflight = None


class _Worker:
    """A worker process's event loop over its share of the virtual clients."""

    def __init__(self, spec: dict, p: LoadParams, client_ids: list[int], stop: Any = None) -> None:
        self.spec = spec
        self.kind = spec["kind"]
        self.p = p
        self.sel = selectors.DefaultSelector()
        self.keys = KeyGen(p.keyspace, p.dist, seed=p.seed * 1000 + (client_ids[0] if client_ids else 0))
        self.rng = random.Random(p.seed * 7919 + (client_ids[0] if client_ids else 0))
        self.value = make_value(p.value_size)
        self.hist = Hist()
        self.ops = 0
        self.errors: dict[str, int] = {}
        self.indeterminate = 0
        self.txn_retries = 0
        self.stop_event = stop
        self.vcs = [_VClient(self, i) for i in client_ids]
        self.measure_from = 0.0
        self.measure_to = 0.0
        if self.kind == "raftkv":
            from shards.shardmap import ShardMap

            self.map = ShardMap.load(spec["config"])
            self.nodes = {n: tuple(a) for n, a in spec["nodes"].items()}
            self.shard_cache: dict[bytes, int] = {}
            self.leaders: dict[int, str] = {}
            self.last_refresh = 0.0
            self.refresh_leaders(force=True)
        elif self.kind == "redis":
            self.addr = tuple(spec["addr"])
            self.cas_sha = resp_call(self.addr, "SCRIPT", "LOAD", _REDIS_CAS).decode()
        elif self.kind == "etcd":
            self.addrs = [tuple(a) for a in spec["addrs"]]
            self.member_of = {vc.idx: vc.idx % len(self.addrs) for vc in self.vcs}
            self.vb64 = b64(self.value)

    # -- raftkv routing ----------------------------------------------------------------------
    def shard(self, k: bytes) -> int:
        s = self.shard_cache.get(k)
        if s is None:
            s = self.shard_cache[k] = self.map.shard_for_key(k)
        return s

    def refresh_leaders(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_refresh < 0.1:
            return
        self.last_refresh = now
        for n in self.rng.sample(list(self.nodes), len(self.nodes)):
            try:
                rows = resp_call(self.nodes[n], "RAFTKV.SHARDS", timeout=0.3)
            except OSError:
                continue
            if isinstance(rows, protocol.ReplyError):
                continue
            for s, leader, _term in rows:
                if leader is not None:
                    self.leaders[s] = leader.decode()
            if len(self.leaders) >= self.map.nshards:
                return

    def leader_addr(self, shard: int, vc: _VClient) -> tuple[str, int]:
        name = self.leaders.get(shard)
        if name is None:
            reps = self.map.replicas(shard)
            name = reps[(vc.idx + vc.seq) % len(reps)].name
        return self.nodes[name]

    def keys_on_distinct_shards(self, n: int) -> list[bytes]:
        """``n`` keys spanning min(n, shards) shards (the first two always on different shards)."""
        want = min(n, self.map.nshards)
        while True:
            ks = self.distinct_keys(n)
            if len({self.shard(k) for k in ks}) >= want and self.shard(ks[0]) != self.shard(ks[1]) or want < 2:
                return ks

    def distinct_keys(self, n: int) -> list[bytes]:
        """``n`` different keys (etcd rejects a transaction that names a key twice)."""
        ks: list[bytes] = []
        while len(ks) < n:
            k = key_name(self.keys.next())
            if k not in ks:
                ks.append(k)
        return ks

    # -- building one request ------------------------------------------------------------------------
    def op_name(self) -> str:
        w = self.p.workload
        if w == "mix":
            return "put" if self.rng.random() < 0.5 else "get"
        return w

    def issue(self, vc: _VClient) -> None:
        """Send ``vc``'s next request (a connection failure counts as an error, and we try again later)."""
        retry = vc.txn_args is not None
        op = vc.op if retry else self.op_name()
        vc.op = op
        vc.is_write = op in WRITES
        try:
            conn, payload = getattr(self, f"_req_{self.kind}")(vc, op)
            if not retry:
                vc.sent = time.perf_counter()
            conn.sock.sendall(payload)
            vc.inflight = conn
        except OSError:
            self.error("CONN", vc, False, time.perf_counter())
            vc.inflight = None
            vc.txn_args = None
            for c in list(vc.conns.values()):
                vc.drop(c)
            if self.kind == "raftkv":
                self.leaders.clear()
            elif self.kind == "etcd":
                self.member_of[vc.idx] = (self.member_of[vc.idx] + 1) % len(self.addrs)

    def _req_raftkv(self, vc: _VClient, op: str) -> tuple[_Conn, bytes]:
        enc = protocol.encode_command
        v = self.value
        if op in ("mset2", "mset4", "txn"):
            # As Client.mset()/Client.txn(): RAFTKV.TXN with a fresh ID, sent to the first key's shard leader.
            if vc.txn_args is None:
                if op == "txn":
                    a, b = self.keys_on_distinct_shards(2)[:2]
                    vc.txn_args = [b"2", a, b"VALUE", v, b, b"VALUE", v, b"2", b"PUT", a, v, b"PUT", b, v, b"0"]
                else:
                    ks = self.keys_on_distinct_shards(2 if op == "mset2" else 4)
                    vc.txn_args = [b"0", b"%d" % len(ks)]
                    for k in ks:
                        vc.txn_args += [b"PUT", k, v]
                    vc.txn_args.append(b"0")
                vc.retries = 0
            shard = self.shard(vc.txn_args[1] if op == "txn" else vc.txn_args[3])
            vc.ctx = shard
            return vc.conn(self.leader_addr(shard, vc)), enc(b"RAFTKV.TXN", b"ID", uuid.uuid4().hex.encode(),
                                                            *vc.txn_args)
        k = key_name(self.keys.next())
        shard = self.shard(k)
        vc.ctx = shard
        if op == "get":
            return vc.conn(self.leader_addr(shard, vc)), enc(b"GET", k)
        if op == "stale_get":
            reps = self.map.replicas(shard)
            return vc.conn(self.nodes[reps[vc.idx % len(reps)].name]), enc(b"RAFTKV.STALEGET", k)
        vc.seq += 1
        if op == "put":
            inner: tuple = (b"SET", k, v)
        elif op == "cas":
            inner = (b"CAS", k, v, v)
        else:
            raise ValueError(f"unknown op {op}")
        return vc.conn(self.leader_addr(shard, vc)), enc(b"RAFTKV.REQ", vc.sid, b"%d" % vc.seq, *inner)

    def _req_redis(self, vc: _VClient, op: str) -> tuple[_Conn, bytes]:
        enc = protocol.encode_command
        v = self.value
        c = vc.conn(self.addr)
        if op in ("mset2", "mset4"):
            args = [b"MSET"]
            for k in self.distinct_keys(2 if op == "mset2" else 4):
                args += [k, v]
            return c, enc(*args)
        if op == "txn":
            return c, enc(b"EVALSHA", self.cas_sha, b"2", *self.distinct_keys(2), v, v, b"txn")
        k = key_name(self.keys.next())
        if op == "put":
            return c, enc(b"SET", k, v)
        if op in ("get", "stale_get"):
            return c, enc(b"GET", k)
        if op == "cas":
            return c, enc(b"EVALSHA", self.cas_sha, b"1", k, v, v)
        raise ValueError(f"unknown op {op}")

    def _req_etcd(self, vc: _VClient, op: str) -> tuple[_Conn, bytes]:
        host, port = self.addrs[self.member_of[vc.idx]]
        c = vc.conn((host, port))
        v = self.vb64
        if op in ("mset2", "mset4", "txn"):
            ks = [b64(k) for k in self.distinct_keys(2 if op != "mset4" else 4)]
            cmp = [{"key": k, "result": "EQUAL", "target": "VALUE", "value": v} for k in ks] if op == "txn" else []
            body = {"compare": cmp, "success": [{"requestPut": {"key": k, "value": v}} for k in ks]}
            return c, http_request(host, port, "/v3/kv/txn", body)
        k = b64(key_name(self.keys.next()))
        if op == "put":
            return c, http_request(host, port, "/v3/kv/put", {"key": k, "value": v})
        if op == "get":
            return c, http_request(host, port, "/v3/kv/range", {"key": k})
        if op == "stale_get":
            return c, http_request(host, port, "/v3/kv/range", {"key": k, "serializable": True})
        if op == "cas":
            body = {"compare": [{"key": k, "result": "EQUAL", "target": "VALUE", "value": v}],
                    "success": [{"requestPut": {"key": k, "value": v}}]}
            return c, http_request(host, port, "/v3/kv/txn", body)
        raise ValueError(f"unknown op {op}")

    # -- outcomes -------------------------------------------------------------------------------
    def in_window(self, sent: float, now: float) -> bool:
        return sent >= self.measure_from and now <= self.measure_to

    def error(self, code: str, vc: _VClient, maybe_applied: bool, now: float) -> None:
        if not self.in_window(vc.sent, now) and vc.sent:
            return
        self.errors[code] = self.errors.get(code, 0) + 1
        if maybe_applied:
            self.indeterminate += 1

    def on_reply(self, vc: _VClient, reply: Any, now: float) -> None:
        vc.inflight = None
        if self.kind == "etcd":
            status, body = reply
            if status != 200:
                try:
                    code = "etcd:" + json.loads(body).get("error", str(status))[:40]
                except ValueError:
                    code = f"HTTP{status}"
                self.error(code, vc, vc.is_write and status >= 500, now)  # a 4xx was rejected, not applied
                self.member_of[vc.idx] = (self.member_of[vc.idx] + 1) % len(self.addrs)
                return
        elif isinstance(reply, protocol.ReplyError):
            if vc.txn_args is not None and reply.code in ("TXNCONFLICT", "TRYAGAIN") and vc.retries < 10 \
                    and now < self.measure_to:
                vc.retries += 1  # as Txn.commit(retries=10): a definite abort, resent with a fresh ID
                self.txn_retries += 1
                return
            vc.txn_args = None
            self.error(reply.code, vc, reply.code == "UNKNOWN" and vc.is_write, now)
            if self.kind == "raftkv" and reply.code in _RETRY_CODES:
                self.leaders.pop(vc.ctx, None)
                self.refresh_leaders()
            return
        vc.txn_args = None
        if self.in_window(vc.sent, now):
            self.hist.record(now - vc.sent)
            self.ops += 1

    def on_conn_lost(self, c: _Conn, now: float) -> None:
        vc = c.vc
        if vc.inflight is c:
            self.error("CONN", vc, vc.is_write, now)
            vc.txn_args = None
        vc.drop(c)
        if self.kind == "raftkv":
            self.leaders.clear()
            self.refresh_leaders()
        elif self.kind == "etcd":
            self.member_of[vc.idx] = (self.member_of[vc.idx] + 1) % len(self.addrs)

    # -- the loop -------------------------------------------------------------------------------
    def run(self, start_at: float, measure_from: float, measure_to: float) -> None:
        self.measure_from, self.measure_to = measure_from, measure_to
        while time.perf_counter() < start_at:
            time.sleep(min(0.01, max(0.0, start_at - time.perf_counter())))
        for vc in self.vcs:
            self.issue(vc)
        next_check = time.perf_counter() + 0.05
        while True:
            now = time.perf_counter()
            if now >= measure_to or (self.stop_event is not None and self.stop_event.is_set()):
                break
            for key, _ in self.sel.select(0.05):
                c: _Conn = key.data
                try:
                    data = c.sock.recv(262144)
                except OSError:
                    data = b""
                now = time.perf_counter()
                if not data:
                    self.on_conn_lost(c, now)
                    self.issue(c.vc)
                    continue
                c.reader.feed(data)
                while True:
                    try:
                        reply = c.reader.gets()
                    except (hiredis.ProtocolError, ValueError, IndexError):
                        self.on_conn_lost(c, now)
                        break
                    if reply is False:
                        break
                    self.on_reply(c.vc, reply, now)
                    if now < measure_to:
                        self.issue(c.vc)
            now = time.perf_counter()
            if now >= next_check:
                next_check = now + 0.05
                for vc in self.vcs:
                    if vc.inflight is None:
                        self.issue(vc)  # a client whose last attempt could not even connect
                    elif now - vc.sent > self.p.op_timeout:
                        self.error("TIMEOUT", vc, vc.is_write, now)
                        vc.txn_args = None
                        vc.drop(vc.inflight)
                        self.issue(vc)
                if self.kind == "raftkv" and len(self.leaders) < self.map.nshards:
                    self.refresh_leaders()
        for vc in self.vcs:
            for c in list(vc.conns.values()):
                vc.drop(c)

    def result(self) -> dict:
        return {"hist": self.hist.to_dict(), "ops": self.ops, "errors": self.errors,
                "indeterminate": self.indeterminate, "txn_retries": self.txn_retries}


_REDIS_CAS = """
if ARGV[3] == 'txn' then
  if redis.call('get', KEYS[1]) == ARGV[1] and redis.call('get', KEYS[2]) == ARGV[1] then
    redis.call('set', KEYS[1], ARGV[2]); redis.call('set', KEYS[2], ARGV[2]); return 1
  end
  return 0
end
if redis.call('get', KEYS[1]) == ARGV[1] then redis.call('set', KEYS[1], ARGV[2]); return 1 end
return 0
"""


def _client_thread(spec: dict, p: LoadParams, idx: int, t: dict, out: dict, lock: threading.Lock,
                   client: Any) -> None:
    """One ``raftkv.Client`` thread (``via="client"``)."""
    from raftkv.client import IndeterminateError, RaftKVError

    keys = KeyGen(p.keyspace, p.dist, seed=p.seed * 1000 + idx)
    rng = random.Random(idx)
    v = make_value(p.value_size)
    hist, ops, errors, indet = Hist(), 0, {}, 0
    while time.perf_counter() < t["start"]:
        time.sleep(0.005)
    while True:
        op = p.workload if p.workload != "mix" else ("put" if rng.random() < 0.5 else "get")
        k = key_name(keys.next())
        sent = time.perf_counter()
        if sent >= t["to"]:
            break
        try:
            if op == "put":
                client.put(k, v)
            elif op == "get":
                client.get(k)
            elif op == "stale_get":
                client.stale_get(k)
            elif op == "cas":
                client.cas(k, v, v)
            elif op in ("mset2", "mset4"):
                client.mset({key_name(keys.next()): v for _ in range(2 if op == "mset2" else 4)})
            elif op == "txn":
                a, b = key_name(keys.next()), key_name(keys.next())
                client.txn().if_value(a, v).if_value(b, v).then_put(a, v).then_put(b, v).commit(retries=10)
            else:
                raise ValueError(f"workload {op} is not supported with --via client")
            ok = True
        except IndeterminateError:
            ok, code, indet_inc = False, "UNKNOWN", 1
        except RaftKVError as e:
            ok, code, indet_inc = False, e.code, 0
        now = time.perf_counter()
        if sent >= t["from"] and now <= t["to"]:
            if ok:
                hist.record(now - sent)
                ops += 1
            else:
                errors[code] = errors.get(code, 0) + 1
                indet += indet_inc
    with lock:
        out["hist"].merge(hist)
        out["ops"] += ops
        out["indeterminate"] += indet
        for c, n in errors.items():
            out["errors"][c] = out["errors"].get(c, 0) + n


def _worker_main(spec: dict, p: LoadParams, client_ids: list[int], times: tuple[float, float, float],
                 q: Any, stop: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cpu0 = os.times()
    try:
        if p.via == "client":
            from raftkv.client import Client

            client = Client(cluster=spec["config"], timeout=p.op_timeout)
            out = {"hist": Hist(), "ops": 0, "errors": {}, "indeterminate": 0}
            lock = threading.Lock()
            t = {"start": times[0], "from": times[1], "to": times[2]}
            threads = [threading.Thread(target=_client_thread, args=(spec, p, i, t, out, lock, client))
                       for i in client_ids]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            res = {"hist": out["hist"].to_dict(), "ops": out["ops"], "errors": out["errors"],
                   "indeterminate": out["indeterminate"]}
        else:
            w = _Worker(spec, p, client_ids, stop)
            w.run(*times)
            res = w.result()
    except Exception as e:  # noqa: BLE001 - report to the parent rather than hang it
        res = {"failed": f"{type(e).__name__}: {e}"}
    cpu1 = os.times()
    res["cpu_s"] = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    q.put(res)


def default_procs(clients: int) -> int:
    return max(1, min(clients, os.cpu_count() or 1))


class LoadRun:
    """A load run in worker processes; ``start()`` returns at once, ``finish()`` merges the results."""

    def __init__(self, system: System | dict, p: LoadParams, name: str | None = None) -> None:
        self.spec = system.spec() if isinstance(system, System) else system
        self.name = name or (system.name if isinstance(system, System) else self.spec["kind"])
        self.pids = system.pids() if isinstance(system, System) else []
        self.p = p
        self.procs = p.procs or default_procs(p.clients)
        ctx = mp.get_context("fork")
        self.q = ctx.Queue()
        self.stop_event = ctx.Event()
        now = time.perf_counter()
        self.start_at = now + 0.3 + 0.05 * self.procs
        self.measure_from = self.start_at + p.warmup
        self.measure_to = self.measure_from + p.duration
        share = [[i for i in range(p.clients) if i % self.procs == w] for w in range(self.procs)]
        self.workers = [ctx.Process(target=_worker_main, daemon=True,
                                    args=(self.spec, p, ids, (self.start_at, self.measure_from, self.measure_to),
                                          self.q, self.stop_event))
                        for ids in share]

    def start(self) -> LoadRun:
        for w in self.workers:
            w.start()
        return self

    def stop(self) -> None:
        """End early (the failover benchmark); the window closes now."""
        self.measure_to = min(self.measure_to, time.perf_counter())
        self.stop_event.set()

    def finish(self) -> Result:
        cpu0 = None
        while time.perf_counter() < self.measure_to and not self.stop_event.is_set():
            now = time.perf_counter()
            if cpu0 is None and now >= self.measure_from:
                cpu0 = (now, sum(proc_cpu_s(pid) for pid in self.pids))
            time.sleep(min(0.05, max(0.001, (self.measure_from if cpu0 is None else self.measure_to) - now)))
        server_cpu = None
        if cpu0 is not None and self.pids:
            t1 = time.perf_counter()
            server_cpu = round((sum(proc_cpu_s(pid) for pid in self.pids) - cpu0[1]) / max(1e-6, t1 - cpu0[0]), 2)
        results = [self.q.get(timeout=self.p.op_timeout + 60) for _ in self.workers]
        for w in self.workers:
            w.join(10)
        failed = [r["failed"] for r in results if "failed" in r]
        if failed:
            raise RuntimeError(f"load generator worker failed: {failed[0]}")
        hist = Hist()
        errors: dict[str, int] = {}
        ops = indet = 0
        retries = sum(r.get("txn_retries", 0) for r in results)
        for r in results:
            hist.merge(Hist.from_dict(r["hist"]))
            ops += r["ops"]
            indet += r["indeterminate"]
            for c, n in r["errors"].items():
                errors[c] = errors.get(c, 0) + n
        seconds = max(1e-6, self.measure_to - self.measure_from)
        cpu = sum(r["cpu_s"] for r in results)
        gen = {"procs": self.procs, "clients_per_proc": math.ceil(self.p.clients / self.procs),
               "via": self.p.via, "cpu_s_per_s": round(cpu / (seconds + self.p.warmup), 2)}
        return Result(self.name, self.p.workload, self.p.clients, ops, round(seconds, 3), round(ops / seconds, 1),
                      _r(hist.quantile(0.5)), _r(hist.quantile(0.99)), _r(hist.quantile(0.999)),
                      sum(errors.values()), indet, errors, gen, retries, server_cpu, hist.to_dict())


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def run_load(system: System | dict, p: LoadParams, name: str | None = None) -> Result:
    return LoadRun(system, p, name).start().finish()


# -- preloading ---------------------------------------------------------------------------------------------


def preload(system: System, n: int, value_size: int = 100, start: int = 0, pipeline: int = 100,
            conns_per_node: int = 3) -> float:
    """SET keys ``start..n-1`` (pipelined, plain SET to each shard's leader); returns the seconds taken."""
    t0 = time.monotonic()
    v = make_value(value_size)
    if isinstance(system, EtcdSystem):
        _preload_etcd(system, range(start, n), v)
        return time.monotonic() - t0
    if isinstance(system, RaftKVSystem):
        m = system.lc.map
        leaders = system.lc.leaders()
        groups: dict[tuple[str, int], list[int]] = {}
        for i in range(start, n):
            node = leaders[m.shard_for_key(key_name(i))] or m.replicas(m.shard_for_key(key_name(i)))[0].name
            groups.setdefault(m.nodes[node].client_addr, []).append(i)
    else:
        groups = {tuple(system.spec()["addr"]): list(range(start, n))}  # type: ignore[dict-item]
    jobs = [(addr, idx[c::conns_per_node]) for addr, idx in groups.items() for c in range(conns_per_node)]
    errors: list[str] = []
    retry: list[tuple[tuple[str, int], int]] = []

    def load(addr: tuple[str, int], idx: list[int]) -> None:
        with socket.create_connection(addr, timeout=60) as s:
            r = protocol.reply_reader()
            for j in range(0, len(idx), pipeline):
                chunk = idx[j:j + pipeline]
                s.sendall(b"".join(protocol.encode_command(b"SET", key_name(i), v) for i in chunk))
                got = 0
                while got < len(chunk):
                    rep = r.gets()
                    if rep is False:
                        data = s.recv(262144)
                        if not data:
                            raise ConnectionError("closed during preload")
                        r.feed(data)
                        continue
                    if isinstance(rep, protocol.ReplyError):
                        if rep.code in _RETRY_CODES:  # BUSY (back-pressure), TRYAGAIN...: send again below
                            retry.append((addr, chunk[got]))
                        else:
                            errors.append(str(rep))
                    got += 1

    threads = [threading.Thread(target=load, args=job) for job in jobs if job[1]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for addr, i in retry:
        rep = resp_call(addr, "SET", key_name(i), v, timeout=10)
        if isinstance(rep, protocol.ReplyError):
            errors.append(str(rep))
    if errors:
        raise RuntimeError(f"preload: {len(errors)} errors, first: {errors[0]}")
    return time.monotonic() - t0


def _preload_etcd(system: EtcdSystem, idx: range, v: bytes, threads: int = 24) -> None:
    import http.client

    vb = b64(v)
    errors: list[str] = []

    def load(part: range, addr: tuple[str, int]) -> None:
        c = http.client.HTTPConnection(*addr, timeout=30)
        for i in part:
            c.request("POST", "/v3/kv/put", json.dumps({"key": b64(key_name(i)), "value": vb}),
                      {"Content-Type": "application/json"})
            r = c.getresponse()
            r.read()
            if r.status != 200:
                errors.append(str(r.status))
        c.close()

    ts = [threading.Thread(target=load, args=(idx[t::threads], system.addr(system.names[t % len(system.names)])))
          for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise RuntimeError(f"etcd preload: {len(errors)} errors")


# -- redis-benchmark ------------------------------------------------------------------------------------------


def run_redis_benchmark(addr: tuple[str, int], clients: int, requests: int, value_size: int,
                        keyspace: int) -> dict[str, dict]:
    """``redis-benchmark -t set,get`` (CSV); {test: {rps, avg_ms, p50_ms, p99_ms}}."""
    cmd = ["redis-benchmark", "-h", addr[0], "-p", str(addr[1]), "-t", "set,get", "-n", str(requests),
           "-c", str(clients), "-d", str(value_size), "-r", str(keyspace), "--csv"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    res: dict[str, dict] = {}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith('"')]
    if not lines:
        raise RuntimeError(f"redis-benchmark gave no CSV output: {out.stderr.strip()[:200]}")
    header = [h.strip('"') for h in lines[0].split(",")]
    for ln in lines[1:]:
        row = dict(zip(header, [c.strip('"') for c in ln.split(",")], strict=False))
        res[row["test"]] = {"rps": float(row["rps"]), "avg_ms": float(row.get("avg_latency_ms", "nan")),
                            "p50_ms": float(row.get("p50_latency_ms", "nan")),
                            "p99_ms": float(row.get("p99_latency_ms", "nan"))}
    res["command"] = {"argv": " ".join(cmd)}  # type: ignore[assignment]
    return res


# -- machine ------------------------------------------------------------------------------------------------


def machine() -> dict:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = None
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem = f.readline().split()[1]
    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "kernel": platform.release(), "mem_gb": round(int(mem) / 1024 / 1024, 1) if mem else None}


# -- the suite ----------------------------------------------------------------------------------------------


@dataclass
class SuiteConfig:
    workloads: list[str] = field(default_factory=lambda: ["put"])
    clients: list[int] = field(default_factory=lambda: [1, 32])
    duration: float = 10.0
    warmup: float = 1.0
    shards: int = 3
    peers: list[str] = field(default_factory=lambda: list(ALL_PEERS))
    keyspace: int = 10_000
    value_size: int = 100
    dist: str = "uniform"
    procs: int = 0
    via: str = "raw"
    redis_benchmark: bool = True
    redis_benchmark_requests: int = 20_000
    json_path: str | None = None
    png_path: str | None = None
    workdir: str | None = None


def _say(msg: str) -> None:
    print(msg, flush=True)


def run_suite(cfg: SuiteConfig, out: Any = _say) -> dict:
    """The side-by-side run; returns (and writes, if asked) the JSON document."""
    for w in cfg.workloads:
        if w not in WORKLOADS:
            raise ValueError(f"unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")
    support = txn_support()
    unavailable = [w for w in cfg.workloads if w in TXN_WORKLOADS and not support[w]]
    workloads = [w for w in cfg.workloads if w not in unavailable]
    peers, skipped = found_peers(cfg.peers)
    if cfg.via == "client" and peers:
        skipped.update({p: "--via client drives raftkv only" for p in peers})
        peers = []
    mach = machine()
    doc: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv), "machine": mach,
        "config": asdict(cfg), "peers_found": peers, "peers_skipped": skipped,
        "not_available": {w: "not available in this build" for w in unavailable},
        "systems": {}, "results": [], "redis_benchmark": {},
    }
    doc["loadavg_at_start"] = [round(x, 1) for x in os.getloadavg()]
    out(f"load average at start: {doc['loadavg_at_start']} (other processes on this machine share the CPUs)")
    out(f"machine: {mach['nproc']} CPUs ({mach['cpu']}), Python {mach['python']}, kernel {mach['kernel']}")
    out(f"peers found: {', '.join(peers) or 'none'}; skipped: "
        + (", ".join(f"{p} ({why})" for p, why in skipped.items()) or "none"))
    for w in unavailable:
        out(f"workload {w}: not available in this build (no {'MSET' if w.startswith('mset') else 'RAFTKV.TXN'} "
            "command in raftkv.node)")
    procs_desc = (f"{cfg.procs or 'min(clients, nproc)'} worker process(es), each one selectors event loop over raw "
                  "sockets, one connection per client per node, closed loop (1 request in flight per client)")
    if cfg.via == "client":
        procs_desc = f"{cfg.procs or 'min(clients, nproc)'} worker process(es), each with threads using raftkv.Client"
    out(f"load generator: {procs_desc}; warmup {cfg.warmup:g} s then {cfg.duration:g} s measured per point; "
        f"keys {cfg.dist} over {cfg.keyspace} (preloaded), values {cfg.value_size} B")
    doc["generator"] = procs_desc
    base = Path(cfg.workdir or tempfile.mkdtemp(prefix="raftkv-bench-"))
    # All systems run at once but only one is driven at a time: the points of one (workload, clients) pair
    # are measured back to back, so background load on a shared machine hits each system alike.
    running: dict[str, System] = {}
    try:
        for sname in ["raftkv", *peers]:
            d = base / sname
            d.mkdir(parents=True, exist_ok=True)
            out(f"== {sname}: starting")
            t0 = time.monotonic()
            if sname == "raftkv":
                running[sname] = RaftKVSystem(str(d), shards=cfg.shards)
            elif sname == "etcd":
                running[sname] = EtcdSystem(str(d))
            else:
                running[sname] = RedisSystem(str(d))
            sys_ = running[sname]
            out(f"   {sys_.description()} (up in {time.monotonic() - t0:.1f} s)")
            doc["systems"][sname] = sys_.description()
            secs = preload(sys_, cfg.keyspace, cfg.value_size)
            out(f"   preloaded {cfg.keyspace} keys in {secs:.1f} s")
        for w in workloads:
            for n in cfg.clients:
                for sys_ in running.values():
                    p = LoadParams(w, n, cfg.duration, cfg.warmup, cfg.keyspace, cfg.value_size, cfg.dist,
                                   cfg.procs, via=cfg.via)
                    r = run_load(sys_, p)
                    row = r.row()
                    row["loadavg_1m"] = round(os.getloadavg()[0], 1)
                    doc["results"].append(row)
                    out("   " + _fmt_row(row))
        if cfg.redis_benchmark and shutil.which("redis-benchmark"):
            for n in cfg.clients:
                for sname, sys_ in running.items():
                    if sname not in ("raftkv", "redis"):
                        continue
                    addr = (next(iter(sys_.lc.map.nodes.values())).client_addr if isinstance(sys_, RaftKVSystem)
                            else tuple(sys_.spec()["addr"]))
                    try:
                        rb = run_redis_benchmark(addr, n, max(cfg.redis_benchmark_requests // (1 if n > 1 else 4),
                                                              1000), cfg.value_size, cfg.keyspace)
                    except (RuntimeError, subprocess.TimeoutExpired) as e:
                        out(f"   redis-benchmark {sname} -c {n}: failed: {e}")
                        continue
                    doc["redis_benchmark"].setdefault(sname, {})[str(n)] = rb
                    out(f"   redis-benchmark {sname} -c {n}: " + ", ".join(
                        f"{t} {v['rps']:.0f}/s p50 {v['p50_ms']} ms p99 {v['p99_ms']} ms"
                        for t, v in rb.items() if t != "command"))
        elif cfg.redis_benchmark:
            out("redis-benchmark not on PATH (Debian: apt-get install redis-tools): skipped")
    finally:
        for sys_ in running.values():
            sys_.stop()
    _add_ratios(doc)
    out("")
    out(render_table(doc))
    if cfg.json_path:
        Path(cfg.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.json_path).write_text(json.dumps(doc, indent=1))
        out(f"wrote {cfg.json_path}")
    if cfg.png_path:
        try:
            plot(doc, cfg.png_path)
            out(f"wrote {cfg.png_path}")
        except ImportError:
            out("matplotlib not installed (pip install -e '.[plot]'): no chart")
    if cfg.workdir is None:
        shutil.rmtree(base, ignore_errors=True)
    return doc


def _add_ratios(doc: dict) -> None:
    idx = {(r["system"], r["workload"], r["clients"]): r for r in doc["results"]}
    for r in doc["results"]:
        if r["system"] != "raftkv":
            continue
        for peer in ALL_PEERS:
            q = idx.get((peer, r["workload"], r["clients"]))
            if q and q["ops_s"]:
                r[f"x_{peer}"] = round(r["ops_s"] / q["ops_s"], 2)


def _fmt_ms(x: float | None) -> str:
    return "-" if x is None else (f"{x:.2f}" if x < 10 else f"{x:.1f}")


def _fmt_row(r: dict) -> str:
    return (f"{r['system']:<7} {r['workload']:<9} c={r['clients']:<3} {r['ops_s']:>9.0f} ops/s  p50 "
            f"{_fmt_ms(r['p50_ms'])} p99 {_fmt_ms(r['p99_ms'])} p99.9 {_fmt_ms(r['p999_ms'])} ms  errors "
            f"{r['errors']} (indeterminate {r['indeterminate']})  server cpu {r['server_cpu']}  "
            f"generator cpu {r['generator'].get('cpu_s_per_s')}" + (f"  load avg {r['loadavg_1m']}" if "loadavg_1m" in r else ""))


def render_table(doc: dict) -> str:
    """Markdown table: one row per (workload, clients, system), with ratios against the peers."""
    head = ("| workload | clients | system | ops/s | p50 ms | p99 ms | p99.9 ms | errors (indet.) | "
            "raftkv ÷ etcd | raftkv ÷ redis |")
    lines = [head, "|" + "---|" * 10]
    order = {s: i for i, s in enumerate(["raftkv", *ALL_PEERS])}
    rows = sorted(doc["results"], key=lambda r: (WORKLOADS.index(r["workload"]), r["clients"],
                                                 order.get(r["system"], 9)))
    for r in rows:
        ratios = [f"{r[k]:.2f}×" if k in r else "" for k in ("x_etcd", "x_redis")]
        lines.append(f"| {r['workload']} | {r['clients']} | {r['system']} | {r['ops_s']:.0f} | "
                     f"{_fmt_ms(r['p50_ms'])} | {_fmt_ms(r['p99_ms'])} | {_fmt_ms(r['p999_ms'])} | "
                     f"{r['errors']} ({r['indeterminate']}) | {ratios[0]} | {ratios[1]} |")
    for w, why in doc.get("not_available", {}).items():
        lines.append(f"| {w} | - | raftkv | {why} | | | | | | |")
    rb = doc.get("redis_benchmark") or {}
    if rb:
        lines += ["", "redis-benchmark -t set,get (one node's port; raftkv forwards keys whose shard it does not lead):",
                  "", "| target | clients | test | req/s | p50 ms | p99 ms |", "|---|---|---|---|---|---|"]
        for target, by_c in rb.items():
            for c, tests in by_c.items():
                for t, v in tests.items():
                    if t != "command":
                        lines.append(f"| {target} | {c} | {t} | {v['rps']:.0f} | {v['p50_ms']} | {v['p99_ms']} |")
    return "\n".join(lines)


def plot(doc: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = doc["results"]
    cmax = max((r["clients"] for r in res), default=1)
    pts = [r for r in res if r["clients"] == cmax]
    workloads = [w for w in WORKLOADS if any(r["workload"] == w for r in pts)]
    systems = [s for s in ["raftkv", *ALL_PEERS] if any(r["system"] == s for r in pts)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(systems))
    for si, s in enumerate(systems):
        by_w = {r["workload"]: r for r in pts if r["system"] == s}
        xs = [i + si * width for i in range(len(workloads))]
        axes[0].bar(xs, [by_w[w]["ops_s"] if w in by_w else 0 for w in workloads], width, label=s)
        axes[1].bar(xs, [(by_w[w]["p99_ms"] or 0) if w in by_w else 0 for w in workloads], width, label=s)
    axes[0].set_yscale("log")
    for ax, title in ((axes[0], f"throughput (ops/s, log scale), {cmax} clients"), (axes[1], f"p99 latency (ms), {cmax} clients")):
        ax.set_xticks([i + width * (len(systems) - 1) / 2 for i in range(len(workloads))])
        ax.set_xticklabels(workloads)
        ax.set_title(title)
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
    m = doc.get("machine", {})
    fig.suptitle(f"raftkv vs peers — {m.get('nproc')} CPUs {m.get('cpu')}, Python {m.get('python')}")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- failover -------------------------------------------------------------------------------------------------


def _probe_write_raftkv(lc: Any, shard: int, exclude: str, deadline: float) -> tuple[float | None, int]:
    """Retry a session write to ``shard`` via the surviving nodes until it succeeds; (success time, attempts)."""
    from raftkv.cluster import _key_on_shard

    key = _key_on_shard(lc.map, shard)
    sid = f"probe-{uuid.uuid4().hex[:8]}".encode()
    survivors = [n for n in lc.map.nodes if n != exclude]
    attempts = 0
    while time.perf_counter() < deadline:
        node = survivors[attempts % len(survivors)]
        attempts += 1
        try:
            rep = resp_call(lc.map.nodes[node].client_addr, "RAFTKV.REQ", sid, "1", "SET", key, b"x", timeout=2.0)
        except OSError:
            continue
        if not isinstance(rep, protocol.ReplyError):
            return time.perf_counter(), attempts
    return None, attempts


def _probe_write_etcd(es: EtcdSystem, exclude: str, deadline: float) -> tuple[float | None, int]:
    survivors = [n for n in es.names if n != exclude]
    attempts = 0
    while time.perf_counter() < deadline:
        n = survivors[attempts % len(survivors)]
        attempts += 1
        try:
            # Short attempts: a member without a leader holds a proposal until its own request timeout,
            # so a long attempt would measure our timeout, not the election.
            st, _ = http_call(es.addr(n), "/v3/kv/put", {"key": b64(b"__failover_probe"), "value": b64(b"x")},
                              timeout=0.2)
        except OSError:
            continue
        if st == 200:
            return time.perf_counter(), attempts
    return None, attempts


def run_failover(trials: int = 5, systems: tuple[str, ...] = ("raftkv", "etcd"), shards: int = 3,
                 load_clients: int = 8, settle: float = 5.0, keyspace: int = 10_000, out: Any = _say,
                 workdir: str | None = None) -> dict:
    """kill -9 the leader of a shard under put load ``trials`` times; time from the kill to the first write."""
    peers, skipped = found_peers([s for s in systems if s != "raftkv"])
    doc: dict[str, Any] = {"machine": machine(), "trials": trials, "load_clients": load_clients, "settle_s": settle,
                           "peers_found": peers, "peers_skipped": skipped, "systems": {}}
    base = Path(workdir or tempfile.mkdtemp(prefix="raftkv-failover-"))
    out(f"failover: {trials} trials per system, put load from {load_clients} clients, {settle:g} s settle "
        f"before each kill; peers found {peers or 'none'}, skipped {skipped or 'none'}")
    for sname in [s for s in systems if s == "raftkv" or s in peers]:  # raftkv first, when asked for
        d = base / sname
        d.mkdir(parents=True, exist_ok=True)
        sysobj: System = RaftKVSystem(str(d), shards=shards) if sname == "raftkv" else EtcdSystem(str(d))
        times: list[float] = []
        lost = 0
        try:
            preload(sysobj, keyspace)
            p = LoadParams("put", load_clients, duration=3600, warmup=0.5, keyspace=keyspace, op_timeout=10)
            run = LoadRun(sysobj, p).start()
            time.sleep(1.0)
            for t in range(trials):
                time.sleep(settle)
                if isinstance(sysobj, RaftKVSystem):
                    lc = sysobj.lc
                    shard = t % lc.map.nshards
                    victim = lc.leader_of(shard)
                    if victim is None:
                        out(f"   trial {t + 1}: shard {shard} has no leader before the kill; skipped")
                        continue
                    t0 = time.perf_counter()
                    lc.signal_node(victim, signal.SIGKILL)
                    ok_at, attempts = _probe_write_raftkv(lc, shard, victim, t0 + 30)
                    lc._reap(victim, 5.0)
                    lc.start_node(victim)
                    lc.wait_ready(60)
                    what = f"shard {shard} leader {victim}"
                else:
                    es = sysobj  # type: ignore[assignment]
                    victim = es.leader()
                    if victim is None:
                        out(f"   trial {t + 1}: no etcd leader before the kill; skipped")
                        continue
                    t0 = time.perf_counter()
                    es.procs[victim].send_signal(signal.SIGKILL)
                    ok_at, attempts = _probe_write_etcd(es, victim, t0 + 30)
                    es.procs[victim].wait()
                    es.start_member(victim)
                    es.wait_ready(60)
                    what = f"leader {victim}"
                if ok_at is None:
                    lost += 1
                    out(f"   trial {t + 1}: {sname} {what}: no successful write within 30 s")
                    continue
                times.append(ok_at - t0)
                out(f"   trial {t + 1}: {sname} killed {what}: first write after {ok_at - t0:.3f} s "
                    f"({attempts} probe attempt(s))")
            run.stop()
            res = run.finish()
        finally:
            sysobj.stop()
        entry = {"times_s": [round(x, 3) for x in times], "no_write_within_30s": lost,
                 "median_s": round(statistics.median(times), 3) if times else None,
                 "worst_s": round(max(times), 3) if times else None,
                 "load": res.row(), "description": sysobj.description()}
        doc["systems"][sname] = entry
        out(f"== {sname}: failover median {entry['median_s']} s, worst {entry['worst_s']} s over {len(times)} kills; "
            f"load: {res.ops} ops, errors {res.errors} {res.error_codes}, indeterminate {res.indeterminate}")
    if workdir is None:
        shutil.rmtree(base, ignore_errors=True)
    return doc


# -- scale ----------------------------------------------------------------------------------------------------


def _status(lc: Any, node: str) -> dict | None:
    try:
        return json.loads(resp_call(lc.map.nodes[node].client_addr, "RAFTKV.STATUS", timeout=2.0))
    except (OSError, ValueError, TypeError):
        return None


def run_scale(shard_counts: tuple[int, ...] = (1, 3, 6), sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000),
              clients: int = 32, duration: float = 8.0, value_size: int = 100, out: Any = _say,
              workdir: str | None = None) -> dict:
    """Throughput/p99 vs shards and vs data size; RSS per million keys; restart catch-up time at the largest size."""
    doc: dict[str, Any] = {"machine": machine(), "clients": clients, "duration_s": duration,
                           "value_size": value_size, "by_shards": [], "by_size": [], "restart": None}
    base = Path(workdir or tempfile.mkdtemp(prefix="raftkv-scale-"))
    out(f"scale: put and get at {clients} clients, {duration:g} s per point")
    for ns in shard_counts:
        d = base / f"shards{ns}"
        s = RaftKVSystem(str(d), shards=ns)
        try:
            preload(s, 10_000, value_size)
            for w in ("put", "get"):
                r = run_load(s, LoadParams(w, clients, duration, keyspace=10_000, value_size=value_size))
                doc["by_shards"].append({"shards": ns, **r.row()})
                out(f"   shards={ns} " + _fmt_row(r.row()))
        finally:
            s.stop()
    d = base / "size"
    s = RaftKVSystem(str(d), shards=3)
    try:
        pids = s.node_pids()
        rss0 = {n: proc_rss_mb(p) for n, p in pids.items() if p}
        doc["rss_empty_mb"] = rss0
        loaded = 0
        for size in sizes:
            secs = preload(s, size, value_size, start=loaded)
            out(f"   loaded keys {loaded}..{size} in {secs:.1f} s ({(size - loaded) / secs:.0f} keys/s)")
            loaded = size
            time.sleep(1.0)
            rss = {n: proc_rss_mb(p) for n, p in s.node_pids().items() if p}
            entry: dict[str, Any] = {"keys": size, "load_s": round(secs, 1), "rss_mb": rss}
            for w in ("put", "get"):
                r = run_load(s, LoadParams(w, clients, duration, keyspace=size, value_size=value_size))
                entry[w] = r.row()
                out(f"   keys={size} " + _fmt_row(r.row()))
            doc["by_size"].append(entry)
            out(f"   keys={size}: RSS per node (MB) " + ", ".join(f"{n} {v:.0f}" for n, v in rss.items() if v))
        last = doc["by_size"][-1]
        per_m = {n: round((last["rss_mb"][n] - (rss0.get(n) or 0)) / (last["keys"] / 1e6), 1)
                 for n in last["rss_mb"] if last["rss_mb"][n]}
        doc["rss_mb_per_million_keys"] = per_m
        out(f"   RSS growth per million keys per node (MB): {per_m}")
        # Restart and catch up: kill -9 a node, write more keys while it is down, start it, time until caught up.
        lc = s.lc
        victim = sorted(lc.map.nodes)[-1]
        lc.kill_node(victim)
        extra = 10_000
        preload_after = RaftKVSystem.__new__(RaftKVSystem)
        preload_after.lc, preload_after.shards = lc, s.shards
        lc.wait_ready(60, nodes=[n for n in lc.map.nodes if n != victim])
        preload(preload_after, loaded + extra, value_size, start=loaded)
        target = {}
        for n in lc.map.nodes:
            if n == victim:
                continue
            st = _status(lc, n) or {"shards": {}}
            for sh, v in st["shards"].items():
                target[sh] = max(target.get(sh, 0), v["commit_idx"])
        t0 = time.monotonic()
        lc.start_node(victim)
        serving_at = caught_at = None
        while time.monotonic() - t0 < 300:
            st = _status(lc, victim)
            if st is not None and serving_at is None:
                serving_at = time.monotonic() - t0
            if st is not None and all(sh in st["shards"] and st["shards"][sh]["last_applied"] >= idx
                                      for sh, idx in target.items()):
                caught_at = time.monotonic() - t0
                break
            time.sleep(0.05)
        rss = proc_rss_mb(lc.pid(victim) or 0)
        doc["restart"] = {"keys": loaded + extra, "written_while_down": extra, "node": victim,
                          "answers_status_s": None if serving_at is None else round(serving_at, 2),
                          "caught_up_s": None if caught_at is None else round(caught_at, 2), "rss_mb_after": rss}
        out(f"   restart of {victim} with {loaded + extra} keys ({extra} written while down): answers after "
            f"{doc['restart']['answers_status_s']} s, caught up (last_applied >= leaders' commit index) after "
            f"{doc['restart']['caught_up_s']} s, RSS {rss} MB")
    finally:
        s.stop()
    if workdir is None:
        shutil.rmtree(base, ignore_errors=True)
    return doc


# -- command line (``raftkv bench`` calls this) -----------------------------------------------------------------


def parse_list(text: str, conv: Any = str) -> list:
    return [conv(x) for x in itertools.chain.from_iterable(t.split(",") for t in [text]) if x.strip()]


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="raftkv bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", default="put", help=f"comma list or 'all': {','.join(WORKLOADS)}")
    ap.add_argument("--clients", default="1,32", help="comma list of concurrencies")
    ap.add_argument("--duration", type=float, default=10.0, help="measured seconds per point")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument("--peers", default="etcd,redis", help="comma list (etcd,redis) or 'none'")
    ap.add_argument("--keyspace", type=int, default=10_000)
    ap.add_argument("--value-size", type=int, default=100)
    ap.add_argument("--dist", choices=["uniform", "zipf"], default="uniform")
    ap.add_argument("--procs", type=int, default=0, help="generator processes (default min(clients, nproc))")
    ap.add_argument("--via", choices=["raw", "client"], default="raw")
    ap.add_argument("--no-redis-benchmark", action="store_true")
    ap.add_argument("--json", dest="json_path")
    ap.add_argument("--png", dest="png_path")
    ap.add_argument("--failover", type=int, metavar="TRIALS", help="run the failover benchmark instead")
    ap.add_argument("--scale", action="store_true", help="run the scale benchmark instead")
    a = ap.parse_args(argv)
    peers = [] if a.peers in ("none", "") else parse_list(a.peers)
    if a.failover:
        doc = run_failover(a.failover, systems=("raftkv", *peers), shards=a.shards, keyspace=a.keyspace)
    elif a.scale:
        doc = run_scale(clients=max(parse_list(a.clients, int)), duration=a.duration, value_size=a.value_size)
    else:
        workloads = list(WORKLOADS) if a.workload == "all" else parse_list(a.workload)
        cfg = SuiteConfig(workloads, parse_list(a.clients, int), a.duration, a.warmup, a.shards, peers, a.keyspace,
                          a.value_size, a.dist, a.procs, a.via, not a.no_redis_benchmark, json_path=None,
                          png_path=a.png_path)
        doc = run_suite(cfg)
    if a.json_path:
        Path(a.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json_path).write_text(json.dumps(doc, indent=1))
        print(f"wrote {a.json_path}")
    return 0
