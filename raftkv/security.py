"""Who may talk to a node: the Raft secret, client passwords, TLS, the loopback rule.

Security model
--------------
* **Raft traffic** (``raftkv.raftnet``: one connection per peer node) starts
  with a handshake in which both ends prove the key (HMAC over fresh nonces);
  after it every record is AES-256-GCM sealed with per-connection keys derived
  from both nonces.  The key is the cluster ``secret``, else the ``node_key``.
  With neither, records are plain pickle: whoever reaches the Raft port can run
  code in the node, so without a ``secret`` a node refuses to bind anything but
  loopback unless ``--insecure`` is given (kept even with a ``node_key``).
* **Clients** authenticate with ``AUTH password`` (Redis ``requirepass``) or
  ``AUTH user password`` (ACL style, ``[security.users]``) when a password or
  users are configured; before that every command but AUTH/HELLO/QUIT answers
  ``-NOAUTH``, a wrong password ``-WRONGPASS``.  Nodes forwarding to each
  other authenticate the same way.
* **Node identity**: the internal RPC (``RAFTKV.RPC``: forwarded commands,
  2PC messages, operator commands run on a shard leader) runs only on a
  connection that proved it comes from a node of this cluster: the node asks
  ``RAFTKV.CHALLENGE`` for a fresh nonce and answers ``RAFTKV.NODEAUTH name
  HMAC-SHA256(node_key, nonce, name)``.  A client sending an internal command
  gets ``-NOPERM`` and nothing runs.  The key is ``[security] node_key``
  (``raftkv cluster up`` writes a random one), else the Raft ``secret``; a
  cluster file with neither falls back to a key derived from public cluster
  facts, which keeps old files working but proves nothing (the node says so).
* **TLS** on the client port when ``tls_cert``/``tls_key`` are set; nodes
  forwarding to a TLS peer use TLS without verifying its certificate (they
  already share the cluster file; the Raft secret is the trust anchor).

Secrets come from ``[security]`` in the cluster file or the environment
(``RAFTKV_SECRET``, ``RAFTKV_PASSWORD``); ``RAFTKV.CLUSTER`` never sends them.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class InsecureBindError(RuntimeError):
    """A node was asked to listen beyond loopback without a cluster secret."""


@dataclass(frozen=True)
class Security:
    """A node's security settings (see module doc)."""

    secret: str | None = None
    node_key: str | None = None
    password: str | None = None
    users: Mapping[str, str] = field(default_factory=dict)
    tls_cert: str | None = None
    tls_key: str | None = None

    @classmethod
    def from_config(cls, security: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Security:
        env = os.environ if env is None else env
        return cls(
            secret=env.get("RAFTKV_SECRET") or security.get("secret") or None,
            node_key=env.get("RAFTKV_NODE_KEY") or security.get("node_key") or None,
            password=env.get("RAFTKV_PASSWORD") or security.get("password") or None,
            users=dict(security.get("users", {})),
            tls_cert=security.get("tls_cert") or None,
            tls_key=security.get("tls_key") or None,
        )

    @property
    def auth_required(self) -> bool:
        return bool(self.password or self.users)

    def check(self, user: str | None, password: str) -> bool:
        """Constant-time check of one AUTH attempt."""
        if user is None or user == "default":
            if self.password is not None and hmac.compare_digest(password.encode(), self.password.encode()):
                return True
            if user is None:
                return False
        expected = self.users.get(user or "")
        return expected is not None and hmac.compare_digest(password.encode(), expected.encode())

    @property
    def node_identity_is_secret(self) -> bool:
        """False when nodes fall back to a key anyone with the cluster's name could derive."""
        return bool(self.node_key or self.secret)

    def node_mac(self, cluster: str, nonce: bytes, name: str) -> bytes:
        """What node ``name`` answers to challenge ``nonce`` (hex HMAC-SHA256, domain-separated)."""
        key = (self.node_key or self.secret or f"raftkv-public-fallback|{cluster}").encode()
        msg = b"raftkv-node-v1|" + cluster.encode() + b"|" + nonce + b"|" + name.encode()
        return hmac.new(key, msg, hashlib.sha256).hexdigest().encode()

    def raft_key(self, cluster: str) -> bytes:
        """The key the Raft network's handshake proves and its record keys derive from (``raftkv.raftnet``)."""
        return (self.secret or self.node_key or f"raftkv-public-fallback|{cluster}").encode()

    @property
    def raft_key_is_secret(self) -> bool:
        """Raft records are encrypted and authenticated (AES-GCM) only under a key outsiders cannot derive."""
        return self.node_identity_is_secret

    def check_node(self, cluster: str, nonce: bytes, name: str, mac: bytes) -> bool:
        """Constant-time check of a node's answer to a challenge."""
        return bool(nonce) and hmac.compare_digest(self.node_mac(cluster, nonce, name), mac)

    def peer_credentials(self) -> list[bytes] | None:
        """What a node sends to AUTH to another node."""
        if self.password:
            return [b"AUTH", self.password.encode()]
        if self.users:
            user, pw = sorted(self.users.items())[0]
            return [b"AUTH", user.encode(), pw.encode()]
        return None

    def server_ssl(self) -> ssl.SSLContext | None:
        if not self.tls_cert:
            return None
        if not self.tls_key:
            raise ValueError("tls_cert is set but tls_key is not")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.tls_cert, self.tls_key)
        return ctx

    def peer_ssl(self) -> ssl.SSLContext | None:
        if not self.tls_cert:
            return None
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx


def is_loopback(host: str) -> bool:
    """True if ``host`` names (or resolves only to) loopback addresses."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def check_bind(hosts: list[str], sec: Security, insecure: bool) -> None:
    """Refuse to listen beyond loopback unless Raft traffic is authenticated (pysyncobj unpickles what it receives).

    Either key authenticates it: the cluster secret, or the node key (the Raft network's handshake proves it and
    its records are sealed under keys derived from it, ``raftkv.raftnet``).
    """
    if sec.raft_key_is_secret or insecure:
        return
    exposed = sorted({h for h in hosts if not is_loopback(h)})
    if exposed:
        raise InsecureBindError(
            f"refusing to listen on {', '.join(exposed)} without a cluster secret or node key: Raft traffic is "
            "then unauthenticated pickle (anyone who reaches the port can run code). Set [security] node_key "
            "or secret in the cluster file (or RAFTKV_SECRET), or pass --insecure if the network is trusted.")
