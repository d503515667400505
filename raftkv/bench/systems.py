"""The systems under test as processes: start, describe, find the pids of, and stop raftkv, etcd and Redis.

Each system runs on loopback in its own directory.  Nothing is installed: ``found_peers`` reports which
peers' binaries are on PATH, and the others are skipped.  ``System.spec()`` is the picklable description
the load generator's worker processes connect with.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import time

from raftkv import protocol
from raftkv.bench.etcd_http import b64, find_leader, http_call
from raftkv.cluster import LocalCluster
from raftkv.connection import Connection

ALL_PEERS = ("etcd", "etcd-grpc", "redis")
# Peers that are one system driven through different APIs: raftkv is compared with the faster of each group.
PEER_GROUPS = {"etcd": ("etcd", "etcd-grpc"), "redis": ("redis",)}
# Peers with a leader to kill: Redis is one unreplicated node, so it has no failover to measure.
FAILOVER_PEERS = ("etcd",)


def found_peers(wanted: list[str]) -> tuple[list[str], dict[str, str]]:
    """(peers whose binaries are on PATH, {peer: reason skipped})."""
    found, skipped = [], {}
    for p in wanted:
        binary = {"etcd": "etcd", "etcd-grpc": "etcd", "redis": "redis-server"}.get(p)
        if binary is None:
            skipped[p] = "unknown peer"
        elif shutil.which(binary) is None:
            skipped[p] = f"'{binary}' not on PATH (Debian: apt-get install {'etcd-server' if binary == 'etcd' else 'redis-server'})"
        elif p == "etcd-grpc" and importlib.util.find_spec("grpc") is None:
            skipped[p] = "Python package grpcio not installed (pip install -e '.[bench]')"
        else:
            found.append(p)
    return found, skipped


def free_ports(n: int) -> list[int]:
    """``n`` loopback ports free right now (the kernel picks them)."""
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
    """CPU-seconds (user + system) ``pid`` has used; 0.0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def proc_rss_mb(pid: int, field: str = "VmRSS") -> float | None:
    """Resident memory of ``pid`` in MB, None once it is gone.

    ``field="RssAnon"``: the anonymous part only (heap: what the process itself holds), without the pages of
    files it maps (the storage engine's data file), which the kernel may drop under memory pressure.
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
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

    def __init__(self, directory: str, shards: int = 3, nodes: int = 3, *, base_port: int | None = None,
                 per_node_hosts: bool = False, node_args: list[str] | None = None) -> None:
        """Start ``nodes`` x ``shards`` and wait until every shard serves; ``per_node_hosts``: node *i* on
        ``127.0.0.i`` (only inside a private network namespace: bench/double_bench.py); ``node_args``: extra
        ``raftkv serve`` arguments for every node."""
        self.lc = LocalCluster.create(directory, nodes=nodes, shards=shards, base_port=base_port,
                                      per_node_hosts=per_node_hosts, node_args=node_args)
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

    def unknown_commands(self, commands: set[str]) -> set[str]:
        """Which of ``commands`` the running nodes do not know (asked, not guessed from the source tree).

        Each is sent with no arguments: a known command answers with an argument or syntax error and does
        nothing; an unknown one answers ``ERR unknown command``.
        """
        name = next(iter(self.lc.map.nodes))
        unknown = set()
        for c in sorted(commands):
            reply = self.lc.call(name, c, timeout=5.0)
            if isinstance(reply, protocol.ReplyError) and reply.message.startswith("unknown command"):
                unknown.add(c)
        return unknown

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
                with Connection("127.0.0.1", self.port, timeout=0.5) as conn:
                    if conn.call("PING") == b"PONG":
                        info = conn.call("INFO", "server")
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"redis-server did not start (see {directory}/redis.log)")
            time.sleep(0.05)
        self.version = next((ln.split(":", 1)[1] for ln in info.decode().splitlines()
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
        alive = [n for n in self.names if self.procs[n].poll() is None]
        i = find_leader([self.addr(n) for n in alive])
        return None if i is None else alive[i]

    def spec(self) -> dict:
        """``leader``: the index in ``addrs`` of the member writes go to first (None: spread them too)."""
        leader = self.leader()
        return {"kind": "etcd", "addrs": [list(self.addr(n)) for n in self.names],
                "leader": None if leader is None else self.names.index(leader)}

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
                "v3 HTTP/JSON gateway (writes to the leader; linearizable range; serializable for stale_get)")


class EtcdGrpcSystem(System):
    """An etcd cluster driven through its native gRPC API (``etcdserverpb.KV``) instead of the JSON gateway.

    It wraps an ``EtcdSystem``: when the suite runs both ``etcd`` and ``etcd-grpc`` they share one cluster,
    so the two drivers are measured against the same members and data.
    """

    name = "etcd-grpc"

    def __init__(self, etcd: EtcdSystem) -> None:
        self.etcd = etcd

    def spec(self) -> dict:
        return {**self.etcd.spec(), "kind": "etcd-grpc"}

    def pids(self) -> list[int]:
        return self.etcd.pids()

    def stop(self) -> None:
        self.etcd.stop()

    def description(self) -> str:
        return (f"etcd {self.etcd.version}: the same members, native gRPC API (grpcio, one HTTP/2 channel per "
                "member per generator process; writes to the leader; linearizable Range; serializable for stale_get)")
