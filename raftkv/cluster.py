"""Run a cluster of node processes on this machine (the embedded default).

Used by ``raftkv cluster up/down``, the tests, the benchmarks and the fault
harness.  Each node is a real ``raftkv serve`` process started in its own
session; its pid and log live in the cluster directory (``DIR/n1.pid``,
``DIR/n1.log``), so a later command (``cluster down``) can find it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

from raftkv import protocol
from raftkv.connection import Connection
from raftkv.security import Security
from shards.shardmap import ShardMap, local_cluster

DEFAULT_DIR = ".raftkv"


class ClusterError(RuntimeError):
    """The local cluster could not be started or did not become ready."""


def free_base_port(n_nodes: int = 3, n_shards: int = 3, host: str = "127.0.0.1") -> int:
    """A base port whose client, metrics and raft ports (see ``local_cluster``) are all free now.

    Chosen below the kernel's ephemeral port range when there is room: a port in that range that is free now
    can be taken a moment later as the local port of any outgoing connection, and the node's bind then fails
    (seen in the test suite beside other clusters' traffic)."""
    import random

    span = 1000 + (n_nodes - 1) * 100 + n_shards
    lo, hi = 20000, 50000
    ephemeral_lo = _ephemeral_range()[0]
    if ephemeral_lo - span > 10000 + 2000:
        lo, hi = 10000, ephemeral_lo - span
    for _ in range(200):
        base = random.randrange(lo, hi)
        ports = [base + i for i in range(n_nodes)] + [base + 500 + i for i in range(n_nodes)]
        ports += [base + 1000 + i * 100 + s for i in range(n_nodes) for s in range(n_shards)]
        if all(_port_free(host, p) for p in ports):
            return base
    raise ClusterError("no free port range found")


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range of local ports for outgoing connections (Linux; IANA's 49152-65535 elsewhere)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
        return lo, hi
    except (OSError, ValueError):
        return 49152, 65535


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def call(addr: tuple[str, int], *args: bytes | str, timeout: float = 2.0, auth: list[bytes] | None = None,
         tls: ssl.SSLContext | None = None) -> object:
    """One RESP command to one node (for status and readiness checks), after AUTH if given.

    ``auth`` is a whole AUTH command (``Security.peer_credentials()``).  Error
    replies, a refused AUTH included, are returned as ``ReplyError`` values.
    """
    try:
        with Connection(addr[0], addr[1], timeout, tls, auth[1:] if auth else None) as conn:
            return conn.call(*args)
    except protocol.ReplyError as refused:
        return refused


class LocalCluster:
    """Node processes of one cluster file, managed through ``DIR``."""

    def __init__(self, directory: str | os.PathLike, shardmap: ShardMap | None = None,
                 node_args: list[str] | None = None, env: dict | None = None) -> None:
        self.dir = Path(directory).resolve()
        self.config = self.dir / "cluster.toml"
        self.node_args = list(node_args or [])
        self.env = env
        self.procs: dict[str, subprocess.Popen] = {}
        if shardmap is not None:
            if not (shardmap.security.get("node_key") or shardmap.security.get("secret")):
                # A random node key: nodes prove to each other that they belong to this cluster (raftkv.security).
                shardmap = dataclasses.replace(shardmap, security={**shardmap.security,
                                                                   "node_key": secrets.token_hex(32)})
            self.dir.mkdir(parents=True, exist_ok=True)
            shardmap.save(self.config)
        if not self.config.exists():
            raise ClusterError(f"{self.config} does not exist; run 'raftkv cluster up' first")
        self.map = ShardMap.load(self.config)
        sec = Security.from_config(self.map.security)
        self._auth, self._tls = sec.peer_credentials(), sec.peer_ssl()

    def call(self, name: str, *args: bytes | str, timeout: float = 2.0) -> object:
        """One command to node ``name`` (authenticated as the cluster file says)."""
        return call(self.map.nodes[name].client_addr, *args, timeout=timeout, auth=self._auth, tls=self._tls)

    @classmethod
    def create(cls, directory: str | os.PathLike, nodes: int = 3, shards: int = 3,
               base_port: int | None = None, per_node_hosts: bool = False, **kw: object) -> LocalCluster:
        """Write a fresh loopback cluster file into ``directory``.

        ``per_node_hosts``: node *i* on ``127.0.0.i`` (inside a private network namespace, where every
        loopback address is ours; see ``jepsen_like.netns``), else every node on ``127.0.0.1``."""
        d = Path(directory).resolve()
        base = base_port if base_port is not None else free_base_port(nodes, shards)
        m = local_cluster(nodes, shards, base_port=base, data_dir=str(d / "data"), per_node_hosts=per_node_hosts)
        return cls(d, m, **kw)  # type: ignore[arg-type]

    # -- processes ---------------------------------------------------------------
    def pid_file(self, name: str) -> Path:
        return self.dir / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        return self.dir / f"{name}.log"

    def pid(self, name: str) -> int | None:
        try:
            pid = int(self.pid_file(name).read_text())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None

    def start_node(self, name: str) -> int:
        if self.pid(name) is not None:
            return self.pid(name)  # type: ignore[return-value]
        log = open(self.log_file(name), "ab")
        env = dict(os.environ if self.env is None else self.env)
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        p = subprocess.Popen(
            [sys.executable, "-m", "raftkv", "serve", "--config", str(self.config), "--node", name,
             *self.node_args],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env=env)
        log.close()
        self.procs[name] = p
        self.pid_file(name).write_text(str(p.pid))
        return p.pid

    def start(self) -> None:
        for name in self.map.nodes:
            self.start_node(name)

    def signal_node(self, name: str, sig: int) -> bool:
        pid = self.pid(name)
        if pid is None:
            return False
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return False
        return True

    def kill_node(self, name: str, timeout: float = 10.0) -> None:
        """``kill -9`` the node and wait until it is gone (reaped, or no longer running).

        A node that is already down is fine (it is gone either way); one still running
        ``timeout`` seconds after the signal raises :class:`ClusterError`: a fault that did
        not happen must not be reported as one that did.
        """
        self.signal_node(name, signal.SIGKILL)
        if not self._reap(name, timeout):
            raise ClusterError(f"{name} (pid {self.pid(name)}) is still running {timeout:g} s after SIGKILL")

    def pause_node(self, name: str, timeout: float = 10.0) -> None:
        """SIGSTOP the node and wait until the kernel reports it stopped, or raise :class:`ClusterError`."""
        if not self.signal_node(name, signal.SIGSTOP):
            raise ClusterError(f"cannot pause {name}: it is not running")
        if not _wait_state(self.pid(name), stopped=True, timeout=timeout):
            raise ClusterError(f"{name} (pid {self.pid(name)}) is not stopped {timeout:g} s after SIGSTOP")

    def resume_node(self, name: str, timeout: float = 10.0) -> None:
        """SIGCONT the node and wait until it runs again (a node that is down is left down)."""
        if self.signal_node(name, signal.SIGCONT) and not _wait_state(self.pid(name), stopped=False,
                                                                       timeout=timeout):
            raise ClusterError(f"{name} (pid {self.pid(name)}) is still stopped {timeout:g} s after SIGCONT")

    def stop_node(self, name: str, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``."""
        if self._terminate(name):
            self._await_exit(name, timeout)
        self.pid_file(name).unlink(missing_ok=True)

    def _terminate(self, name: str) -> bool:
        """SIGCONT (a paused node could not act on it) and SIGTERM; False if ``name`` is not running."""
        return self.signal_node(name, signal.SIGCONT) and self.signal_node(name, signal.SIGTERM)

    def _await_exit(self, name: str, timeout: float) -> None:
        if not self._reap(name, timeout):
            self.signal_node(name, signal.SIGKILL)
            self._reap(name, 5.0)

    def _reap(self, name: str, timeout: float) -> bool:
        pid = self.pid(name)
        p = self.procs.get(name)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if p is not None:
                if p.poll() is not None:
                    return True
            elif pid is None or not _alive(pid):
                return True
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        """Stop every node: SIGTERM to all first, so they shut down side by side, then wait for each
        (SIGKILL after 10 s), as :meth:`stop_node` does for one."""
        terminated = [name for name in self.map.nodes if self._terminate(name)]
        for name in self.map.nodes:
            if name in terminated:
                self._await_exit(name, 10.0)
            self.pid_file(name).unlink(missing_ok=True)

    def running(self) -> list[str]:
        return [n for n in self.map.nodes if self.pid(n) is not None]

    # -- readiness and leadership ------------------------------------------------
    def shard_views(self) -> dict[str, dict]:
        """Each reachable node's ``RAFTKV.STATUS``."""
        out = {}
        for name in self.map.nodes:
            try:
                out[name] = json.loads(self.call(name, "RAFTKV.STATUS", timeout=1.0))  # type: ignore[arg-type]
            except (OSError, ConnectionError, ValueError, TypeError):
                continue
        return out

    def leaders(self) -> dict[int, str | None]:
        """Shard -> node that is leader in the highest term any node reports."""
        best: dict[int, tuple[int, str]] = {}
        for name, st in self.shard_views().items():
            for s, sh in st["shards"].items():
                if sh["role"] == "leader":
                    term = sh["term"]
                    if int(s) not in best or term > best[int(s)][0]:
                        best[int(s)] = (term, name)
        return {s: (best[s][1] if s in best else None) for s in range(self.map.nshards)}

    def leader_of(self, shard: int) -> str | None:
        return self.leaders().get(shard)

    def transfer_leader(self, shard: int, target: str, timeout: float = 20.0) -> None:
        """Make ``target`` the leader of ``shard`` (retries until it is caught up and elected)."""
        deadline = time.monotonic() + timeout
        while self.leader_of(shard) != target:
            if time.monotonic() > deadline:
                raise ClusterError(f"could not move shard {shard}'s leadership to {target} in {timeout:.0f} s")
            for name in self.map.nodes:
                try:
                    self.call(name, "RAFTKV.TRANSFER", str(shard), target, timeout=2.0)
                    break
                except (OSError, ConnectionError):
                    continue
            time.sleep(0.3)

    def wait_ready(self, timeout: float = 30.0, nodes: list[str] | None = None) -> None:
        """Until every shard has a leader that answers a write-free read barrier."""
        deadline = time.monotonic() + timeout
        names = nodes or list(self.map.nodes)
        while True:
            leaders = self.leaders()
            if all(v is not None for v in leaders.values()) and self._serving(names):
                return
            if time.monotonic() > deadline:
                dead = [n for n in names if self.pid(n) is None]
                hint = f"; not running: {', '.join(dead)} (see {self.dir}/<node>.log)" if dead else ""
                raise ClusterError(f"cluster not ready after {timeout:.0f} s: leaders {leaders}{hint}")
            time.sleep(0.1)

    def _serving(self, names: list[str]) -> bool:
        # A linearizable read of one key per shard through some node proves each
        # shard has a leader that can commit.
        name = names[0]
        for s in range(self.map.nshards):
            key = key_on_shard(self.map, s)
            try:
                reply = self.call(name, "GET", key, timeout=5.0)
            except (OSError, ConnectionError):
                return False
            if isinstance(reply, protocol.ReplyError):
                return False
        return True


def key_on_shard(m: ShardMap, shard: int) -> bytes:
    """A key of ``shard`` under map ``m`` (``__probe<i>`` for the smallest such i): probes, tests, benchmarks."""
    for i in range(100000):
        k = f"__probe{i}".encode()
        if m.shard_for_key(k) == shard:
            return k
    raise ClusterError(f"no probe key found for shard {shard}")


def _proc_state(pid: int) -> str | None:
    """The one-letter state in ``/proc/PID/stat`` (``T`` stopped, ``Z`` zombie), None if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]  # the name in (...) may contain spaces
    except (OSError, IndexError):
        return None


def _wait_state(pid: int | None, stopped: bool, timeout: float) -> bool:
    """Until ``pid`` is stopped (``T``/``t``) or not; False on timeout or if it is gone."""
    deadline = time.monotonic() + timeout
    while pid is not None and _alive(pid):
        state = _proc_state(pid)
        if state is None:
            return False
        if (state in "Tt") == stopped:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (killed, not yet reaped by us) is not alive.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return True
