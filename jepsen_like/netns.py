"""A private network namespace for the fault harness, and iptables partitions inside it.

Theory of operation
===================

Partitions must be real (packets dropped by the kernel) without touching the
host's network.  So ``raftkv-jepsen run`` re-executes itself under
``unshare -n -m`` (``unshare --net --mount --map-root-user`` when not root): the
new process has a network namespace of its own with only a loopback device,
which it brings up, and a mount namespace of its own, where the ``disk``
nemesis's small tmpfs data directories are mounted (:func:`mount_tmpfs`).  Every node gets its own loopback address (node *i* listens on
``127.0.0.i``) and ``iptables`` rules on ``lo`` drop traffic between two node
addresses in both directions (``INPUT`` and ``OUTPUT``, ``-s``/``-d``).
Healing flushes those two chains.  The namespace, its rules and every node
process in it vanish when the run ends.

Source addresses.  On loopback the kernel picks ``127.0.0.1`` as the source of
every outgoing connection, whatever the destination, so without help a packet
from node 2 to node 3 would look like one from node 1 and an address rule
could not tell nodes apart.  Two fixes, both inside the namespace only:

* the ``local`` routes of ``127.0.0.0/8`` get ``src 127.0.0.250``
  (:data:`HARNESS_ADDR`), so the harness and its clients (which bind nothing)
  talk from an address no partition rule mentions: clients always reach every
  node, as in Jepsen, where the client side of the network is not cut;
* node processes are started with a tiny ``sitecustomize`` (:func:`write_bind_shim`)
  that binds every outgoing IPv4 TCP socket to the node's own address before
  ``connect``: Raft and forwarding traffic then carry the sender's address.
  (A node binding its own source address would make the shim unnecessary.)

Availability is probed, never assumed (:func:`probe`): ``unshare``, ``ip`` and
a working ``iptables`` binary inside a throwaway namespace, trying
``iptables`` (nft), ``iptables-legacy`` and ``iptables-nft`` in that order.
Every iptables call refuses to run outside a private namespace
(:func:`in_private_netns`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ENV_MARK",
    "HARNESS_ADDR",
    "NetnsError",
    "Availability",
    "probe",
    "inside",
    "in_private_netns",
    "in_private_mountns",
    "mount_tmpfs",
    "reexec_command",
    "reexec_python",
    "setup_inside",
    "Firewall",
    "write_bind_shim",
    "BIND_ENV",
]

ENV_MARK = "RAFTKV_JEPSEN_NETNS"
"""Set (to the iptables binary to use) in the re-executed harness inside the namespace."""

BIND_ENV = "RAFTKV_JEPSEN_BIND"
"""``n1=127.0.0.1,n2=127.0.0.2,...``: read by the bind shim in node processes."""

HARNESS_ADDR = "127.0.0.250"
"""Source address of the harness's own connections inside the namespace."""

IPTABLES_CANDIDATES = ("iptables", "iptables-legacy", "iptables-nft")
_SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")


class NetnsError(RuntimeError):
    """The namespace or iptables could not be used; the message says why."""


def _which(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in _SBIN:
        p = Path(d) / name
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return None


@dataclass(frozen=True)
class Availability:
    """Result of :func:`probe`: ``ok`` with the command prefix and iptables binary, or a reason."""

    ok: bool
    reason: str = ""
    unshare: tuple[str, ...] = ()
    iptables: str = ""


def _unshare_prefix() -> tuple[str, ...] | None:
    unshare = _which("unshare")
    if unshare is None:
        return None
    # A mount namespace too: the disk nemesis mounts size-limited tmpfs data dirs that nobody else sees.
    if os.geteuid() == 0:
        return (unshare, "-n", "-m")
    return (unshare, "--net", "--mount", "--map-root-user")


def probe(timeout: float = 10.0) -> Availability:
    """Can we make a private network namespace with loopback up and working iptables?"""
    prefix = _unshare_prefix()
    if prefix is None:
        return Availability(False, "'unshare' (util-linux) is not installed")
    ip = _which("ip")
    if ip is None:
        return Availability(False, "'ip' (iproute2) is not installed")
    tried = []
    for name in IPTABLES_CANDIDATES:
        ipt = _which(name)
        if ipt is None:
            continue
        script = (f"{ip} link set lo up && {ipt} -w -A OUTPUT -o lo -s 127.0.0.2 -d 127.0.0.3 -j DROP "
                  f"&& {ipt} -w -S OUTPUT | grep -q 127.0.0.3 && {ipt} -w -F OUTPUT")
        try:
            r = subprocess.run([*prefix, "sh", "-c", script], capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            return Availability(False, f"cannot run {' '.join(prefix)}: {e}")
        if r.returncode == 0:
            return Availability(True, "", prefix, ipt)
        err = (r.stderr or r.stdout).strip().splitlines()
        tried.append(f"{name}: {err[-1] if err else f'exit {r.returncode}'}")
        if "unshare" in (r.stderr or "") and "Operation not permitted" in (r.stderr or ""):
            return Availability(False, f"unshare failed: {r.stderr.strip()}")
    if not tried:
        return Availability(False, "iptables is not installed (apt-get install iptables, or run 'make sysdeps')")
    return Availability(False, "iptables does not work inside a private network namespace here: " + "; ".join(tried))


def inside() -> bool:
    """True in the harness process re-executed inside its private namespace."""
    return bool(os.environ.get(ENV_MARK)) and in_private_netns()


def in_private_netns() -> bool:
    """True when this process's network namespace differs from PID 1's (or PID 1's is unreadable)."""
    try:
        return os.readlink("/proc/self/ns/net") != os.readlink("/proc/1/ns/net")
    except OSError:
        # Not allowed to look at PID 1 (not root): trust the marker set by reexec_command.
        return bool(os.environ.get(ENV_MARK))


def reexec_command(avail: Availability, argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Command and environment that run ``python -m jepsen_like.cli <argv>`` inside a new namespace."""
    return reexec_python(avail, ["-m", "jepsen_like.cli", *argv])


def reexec_python(avail: Availability, args: list[str]) -> tuple[list[str], dict[str, str]]:
    """Command and environment that run ``python <args>`` (a module or a script) inside a new namespace,
    with :data:`ENV_MARK` set so that :func:`inside` is true there (bench/double_bench.py uses it too)."""
    import sys

    if not avail.ok:
        raise NetnsError(f"network namespace unavailable: {avail.reason}")
    env = dict(os.environ)
    env[ENV_MARK] = avail.iptables
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return [*avail.unshare, "--", sys.executable, *args], env


def _run(cmd: list[str]) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=15)
    if r.returncode != 0:
        raise NetnsError(f"{' '.join(cmd)} failed (exit {r.returncode}): {(r.stderr or r.stdout).strip()}")
    return r.stdout


def setup_inside() -> None:
    """Inside the fresh namespace: loopback up, harness source address :data:`HARNESS_ADDR`."""
    if not in_private_netns():
        raise NetnsError("refusing to configure the network: not inside a private network namespace")
    ip = _which("ip") or "ip"
    _run([ip, "link", "set", "lo", "up"])
    for dst in ("127.0.0.0/8", "127.0.0.1"):
        _run([ip, "route", "change", "table", "local", "local", dst, "dev", "lo", "proto", "kernel",
              "scope", "host", "src", HARNESS_ADDR])


def in_private_mountns() -> bool:
    """True when this process's mount namespace differs from PID 1's (or PID 1's is unreadable)."""
    try:
        return os.readlink("/proc/self/ns/mnt") != os.readlink("/proc/1/ns/mnt")
    except OSError:
        return bool(os.environ.get(ENV_MARK))


def mount_tmpfs(path: str | Path, size_mib: int) -> None:
    """Mount a tmpfs of ``size_mib`` MiB on ``path`` (created if missing); only inside a private mount namespace,
    so the mount vanishes with the run and the host never sees it."""
    if not in_private_mountns():
        raise NetnsError(f"refusing to mount a tmpfs on {path}: not inside a private mount namespace")
    Path(path).mkdir(parents=True, exist_ok=True)
    _run([_which("mount") or "mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0755", "tmpfs", str(path)])


class Firewall:
    """iptables on ``lo`` inside the private namespace: drop between address pairs, heal."""

    def __init__(self, iptables: str | None = None) -> None:
        self.iptables = iptables or os.environ.get(ENV_MARK) or "iptables"
        self.cut: set[frozenset[str]] = set()

    def _ipt(self, *args: str) -> str:
        if not in_private_netns():
            raise NetnsError("refusing to run iptables: not inside a private network namespace")
        return _run([self.iptables, "-w", *args])

    def drop_between(self, a: str, b: str) -> None:
        """Drop every packet between addresses ``a`` and ``b``, both directions."""
        if a == b or frozenset((a, b)) in self.cut:
            return
        for src, dst in ((a, b), (b, a)):
            self._ipt("-A", "INPUT", "-i", "lo", "-s", src, "-d", dst, "-j", "DROP")
            self._ipt("-A", "OUTPUT", "-o", "lo", "-s", src, "-d", dst, "-j", "DROP")
        self.cut.add(frozenset((a, b)))

    def drops(self, src: str, dst: str, port: int, timeout: float = 0.5) -> bool:
        """True if a TCP connection from ``src`` to ``dst:port`` gets no answer (its SYN is dropped).

        A connection that is accepted or refused got through: the rule is not in effect.
        """
        import socket

        with socket.socket() as s:
            s.bind((src, 0))
            s.settimeout(timeout)
            try:
                s.connect((dst, port))
            except TimeoutError:
                return True
            except OSError:
                return False
        return False

    def heal(self) -> None:
        """Remove every rule (flush INPUT and OUTPUT: the namespace is ours alone)."""
        self._ipt("-F", "INPUT")
        self._ipt("-F", "OUTPUT")
        self.cut.clear()

    def rules(self) -> str:
        return self._ipt("-S")


_SHIM = '''\
# Written by jepsen_like.netns for node processes inside the harness's private
# network namespace: bind outgoing IPv4 TCP sockets to this node's own loopback
# address so iptables rules can tell nodes apart.  Never used outside the harness.
import os as _os
import socket as _socket
import sys as _sys

_orig_connect = _socket.socket.connect
_orig_connect_ex = _socket.socket.connect_ex
_addr = []


def _own_addr():
    if not _addr:
        hosts = dict(p.split("=", 1) for p in _os.environ.get("RAFTKV_JEPSEN_BIND", "").split(",") if "=" in p)
        argv = _sys.argv
        name = argv[argv.index("--node") + 1] if "--node" in argv[:-1] else None
        _addr.append(hosts.get(name))
    return _addr[0]


def _bind(sock, address):
    try:
        if sock.family == _socket.AF_INET and sock.type & _socket.SOCK_STREAM and _own_addr():
            if sock.getsockname() == ("0.0.0.0", 0) and str(address[0]).startswith("127."):
                sock.bind((_own_addr(), 0))
    except OSError:
        pass


def _connect(self, address):
    _bind(self, address)
    return _orig_connect(self, address)


def _connect_ex(self, address):
    _bind(self, address)
    return _orig_connect_ex(self, address)


_socket.socket.connect = _connect
_socket.socket.connect_ex = _connect_ex
'''


def write_bind_shim(directory: str | Path) -> Path:
    """Write the node-side ``sitecustomize.py`` into ``directory``; put it on the nodes' PYTHONPATH."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "sitecustomize.py").write_text(_SHIM, encoding="utf-8")
    return d
