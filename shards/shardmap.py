"""The shard map: which nodes hold which shard, where nodes listen, and the epoch.

Theory of operation
-------------------
A cluster is described by one TOML file (``cluster.toml``)::

    [cluster]
    name = "raftkv"
    epoch = 1
    shards = 3             # shard ids are 0..shards-1
    vnodes = 256           # optional, default shards.ring.DEFAULT_VNODES
    replication = 3        # optional, default min(3, number of nodes)
    data_dir = "/abs/path/.raftkv/data"   # node n uses data_dir/n/; relative = relative to this file
    # adding = 3           # only while `raftkv shard add` runs: shard 3's group is placed and hosted
                           # but not on the ring yet, so no key maps to it (raftkv.reshard)
    # removing = 2         # only while `raftkv shard remove` runs: the last shard (2) is still on the ring
                           # and hosted while its keys move to the others (raftkv.reshard)

    [placement]            # optional; default below
    "0" = ["n1", "n2", "n3"]

    [born]                 # only for shards `raftkv shard add` created: the epoch of the map that did
    "3" = 12

    [leases_moved]         # only after `raftkv shard remove` took away a shard that granted leases: the last
    "3" = 41               # sequence number it granted; those leases live on shard 0 now (raftkv.leases)


    [nodes.n1]
    host = "127.0.0.1"
    client_port = 7001
    raft_port = 7101       # the node's one Raft port; its member of shard s is named host:(raft_port + s)
    metrics_port = 7201    # optional

``ShardMap`` is the validated, immutable form of that file. Keys map to shards
through a consistent-hash ring (``shards.ring.Ring``, built once per map); shards
map to an ordered tuple of replica node names (the *placement*). Without an
explicit ``[placement]``, shard ``s`` lives on ``sorted(names)[(s + i) % N]`` for
``i`` in ``range(replication)``; ``to_toml`` always writes the placement out, so a
saved file keeps its placement even if nodes are later added to it. ``replication``
is the number of replicas a shard should have; a placement may differ from it
shard by shard (``raftkv rebalance`` changes one replica of one shard at a time,
and a map is saved after each change), so only an empty shard is refused.

A node listens for Raft on ``raft_port`` only (``raftkv.raftnet``: one connection
per peer carries every shard group), but its member of shard ``s`` keeps the
logical id ``host:(raft_port + s)``, so every node still reserves
``raft_port .. raft_port + shards - 1``: those ids stay unique across nodes and
placement changes can never make two of them collide. Ports are compared per literal host string: ``127.0.0.1`` and
``127.0.0.2`` may reuse port numbers (the fault harness relies on this), while
``localhost`` vs ``127.0.0.1`` aliases are not detected.

Everything here is pure except ``ShardMap.load`` and ``ShardMap.save``. Errors are
``ShardMapError`` (a ``ValueError``) whose message names the file and field.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from shards.ring import DEFAULT_VNODES, VNODES_MAX, Ring

__all__ = ["NodeInfo", "ShardMap", "ShardMapError", "local_cluster"]

_SECURITY_KEYS = ("secret", "node_key", "password", "users", "tls_cert", "tls_key")
SHARDS_MAX = 1024  # a limit on everything: one Raft group (and port) per shard per node
NODES_MAX = 256
PORT_MIN, PORT_MAX = 1, 65535
_NODE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a node name is also a directory name
_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
_CLUSTER_KEYS = ("name", "epoch", "shards", "vnodes", "replication", "data_dir", "adding", "removing")
_NODE_KEYS = ("host", "client_port", "raft_port", "metrics_port")
_TABLES = ("cluster", "nodes", "placement", "security", "born", "leases_moved")


class ShardMapError(ValueError):
    """An invalid cluster file or shard map; the message names the file/field and the fix."""


# -- value checks (shared by the dataclasses and the TOML reader) --------------


def _check_int(value: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ShardMapError(f"{what} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ShardMapError(f"{what} must be in {lo}..{hi}, got {value}")
    return value


def _check_str(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ShardMapError(f"{what} must be a non-empty string, got {value!r}")
    return value


@dataclass(frozen=True)
class NodeInfo:
    """One node: its name and the addresses it listens on."""

    name: str
    host: str
    client_port: int
    raft_port: int
    metrics_port: int | None = None

    def __post_init__(self) -> None:
        _check_str(self.name, "node name")
        if not _NODE_NAME_RE.fullmatch(self.name):
            raise ShardMapError(
                f"node name {self.name!r} must match {_NODE_NAME_RE.pattern} (it names a data directory)"
            )
        _check_str(self.host, f"nodes.{self.name}.host")
        _check_int(self.client_port, f"nodes.{self.name}.client_port", PORT_MIN, PORT_MAX)
        _check_int(self.raft_port, f"nodes.{self.name}.raft_port", PORT_MIN, PORT_MAX)
        if self.metrics_port is not None:
            _check_int(self.metrics_port, f"nodes.{self.name}.metrics_port", PORT_MIN, PORT_MAX)

    def raft_addr(self, shard: int) -> str:
        """The ``host:port`` where this node's replica of ``shard`` speaks Raft."""
        return f"{self.host}:{self.raft_port + shard}"

    @property
    def client_addr(self) -> tuple[str, int]:
        """The ``(host, port)`` where this node serves RESP clients."""
        return (self.host, self.client_port)


def _default_placement(names: list[str], nshards: int, replication: int) -> dict[int, tuple[str, ...]]:
    ordered = sorted(names)
    return {s: tuple(ordered[(s + i) % len(ordered)] for i in range(replication)) for s in range(nshards)}


@dataclass(frozen=True)
class ShardMap:
    """The validated, immutable cluster layout. Construct with ``from_dict``/``load``/``local_cluster``.

    ``nodes`` and ``placement`` are read-only mappings; derive changed maps with
    ``dataclasses.replace`` or ``with_epoch`` (both re-validate).
    """

    name: str
    epoch: int
    nshards: int
    vnodes: int
    replication: int
    data_dir: str
    nodes: Mapping[str, NodeInfo]
    placement: Mapping[int, tuple[str, ...]]
    # [security]: secret (Raft encryption), node_key (node identity on node-to-node links),
    # password / users (client AUTH), tls_cert / tls_key.
    security: Mapping[str, Any] = field(default_factory=dict, repr=False)
    # ``raftkv shard add`` under way: shard ``nshards``'s group is placed (and hosted) but not on the ring
    # yet, so no key maps to it until the map whose ring includes it (``raftkv.reshard``). None otherwise.
    adding: int | None = None
    # ``raftkv shard remove`` under way: shard ``nshards - 1`` (the last) is still on the ring and hosted while its
    # keys move to the others; the next map has one shard less and no group for it. None otherwise.
    removing: int | None = None
    # The epoch at which ``raftkv shard add`` created each shard's group (its *incarnation*); a shard absent
    # here was in the cluster's first map (0). A shard removed and added again is a new group with a new
    # incarnation: nodes never start it from the old one's data, and its Raft frames are told apart on the
    # wire (``raftkv.raftnet.wire_tag``).
    born: Mapping[int, int] = field(default_factory=dict)
    # Removed shards whose leases moved to shard 0: shard -> the last sequence number it had granted
    # (``raftkv.leases.home_in`` routes a lease id by it). Kept while the shard is added again and removed again.
    leases_moved: Mapping[int, int] = field(default_factory=dict)
    ring: Ring = field(init=False, compare=False, repr=False)
    _raft_addr_index: Mapping[str, str] = field(init=False, compare=False, repr=False)

    __hash__ = None  # type: ignore[assignment]  # holds mappings; compare, don't hash

    def __post_init__(self) -> None:
        _check_str(self.name, "cluster.name")
        _check_int(self.epoch, "cluster.epoch", 0, 2**63 - 1)
        _check_int(self.nshards, "cluster.shards", 1, SHARDS_MAX)
        _check_int(self.vnodes, "cluster.vnodes", 1, VNODES_MAX)
        _check_str(self.data_dir, "cluster.data_dir")
        if self.adding is not None:
            _check_int(self.adding, "cluster.adding", self.nshards, self.nshards)
            _check_int(self.nshards + 1, "cluster.shards + 1 (with adding)", 1, SHARDS_MAX)
        if self.removing is not None:
            _check_int(self.removing, "cluster.removing", self.nshards - 1, self.nshards - 1)
            if self.nshards < 2 or self.adding is not None:
                raise ShardMapError("cluster.removing needs at least 2 shards and no shard being added")
        nodes = dict(self.nodes)
        if not nodes:
            raise ShardMapError("no nodes: add at least one [nodes.<name>] table")
        if len(nodes) > NODES_MAX:
            raise ShardMapError(f"{len(nodes)} nodes exceed the limit of {NODES_MAX}")
        for key, info in nodes.items():
            if not isinstance(info, NodeInfo) or info.name != key:
                raise ShardMapError(f"nodes[{key!r}] must be a NodeInfo named {key!r}, got {info!r}")
        _check_int(self.replication, "cluster.replication", 1, len(nodes))
        placement = {s: tuple(names) for s, names in self.placement.items()}
        self._check_placement(placement, nodes)
        self._check_ports(nodes)
        born = {s: b for s, b in self.born.items() if b}
        for s, b in born.items():
            if s not in self.groups:
                raise ShardMapError(f"born.{s}: shard {s} is not in the map (shards 0..{len(self.groups) - 1})")
            _check_int(b, f"born.{s}", 1, self.epoch)
        for s, last in self.leases_moved.items():
            _check_int(s, "leases_moved shard", 1, SHARDS_MAX - 1)
            _check_int(last, f"leases_moved.{s}", 0, 2**63 - 1)
        set_ = object.__setattr__  # frozen: normalise to read-only views once, here
        set_(self, "nodes", MappingProxyType(nodes))
        set_(self, "security", MappingProxyType(dict(self.security)))
        set_(self, "placement", MappingProxyType(dict(sorted(placement.items()))))
        set_(self, "born", MappingProxyType(dict(sorted(born.items()))))
        set_(self, "leases_moved", MappingProxyType(dict(sorted(self.leases_moved.items()))))
        set_(self, "ring", Ring(range(self.nshards), self.vnodes))
        index = {n.raft_addr(s): n.name for n in nodes.values() for s in self.groups}
        set_(self, "_raft_addr_index", MappingProxyType(index))

    def _check_placement(self, placement: dict[int, tuple[str, ...]], nodes: dict[str, NodeInfo]) -> None:
        expected = set(self.groups)
        if set(placement) != expected:
            missing = sorted(expected - set(placement))
            extra = sorted(set(placement) - expected, key=repr)
            raise ShardMapError(
                f"placement must list every shard 0..{len(self.groups) - 1} exactly once"
                f" (missing: {missing}, unknown: {extra})"
            )
        known = ", ".join(sorted(nodes))
        for s, names in placement.items():
            # ``replication`` is the target; while ``raftkv rebalance`` moves replicas (one Raft membership
            # change at a time) a shard holds one more or fewer than the others, so only emptiness is an error.
            if not names:
                raise ShardMapError(f"placement.{s} is empty: every shard needs at least one replica")
            if len(set(names)) != len(names):
                raise ShardMapError(f"placement.{s} lists a node twice: {list(names)}")
            for n in names:
                if n not in nodes:
                    raise ShardMapError(f"placement.{s} names unknown node {n!r} (nodes: {known})")

    def _check_ports(self, nodes: dict[str, NodeInfo]) -> None:
        used: dict[tuple[str, int], str] = {}
        groups = len(self.groups)
        for info in sorted(nodes.values(), key=lambda n: n.name):
            last = info.raft_port + groups - 1
            if last > PORT_MAX:
                raise ShardMapError(
                    f"nodes.{info.name}.raft_port = {info.raft_port} leaves no room for {groups}"
                    f" shards (needs raft_port + {groups - 1} <= {PORT_MAX})"
                )
            claims = [(info.client_port, "client_port")]
            claims += [(info.raft_port + s, f"raft_port + {s} (shard {s})") for s in self.groups]
            if info.metrics_port is not None:
                claims.append((info.metrics_port, "metrics_port"))
            for port, what in claims:
                owner = used.setdefault((info.host, port), f"nodes.{info.name}.{what}")
                if owner != f"nodes.{info.name}.{what}":
                    raise ShardMapError(
                        f"port {info.host}:{port} is used twice: by {owner} and nodes.{info.name}.{what}"
                        f" (each node reserves raft_port..raft_port+{groups - 1})"
                    )

    # -- queries ----------------------------------------------------------------

    @property
    def groups(self) -> range:
        """Every shard id with a group: the ring's ``0..nshards-1``, and ``adding`` while a shard is added."""
        return range(self.nshards + (self.adding is not None))

    @property
    def ring_tag(self) -> str:
        """Names the ring and the groups its shards are: ``"<shards>.<newest incarnation among them>"``.

        Equal tags mean the same shard for every key and the same groups, so a transaction planned under one
        (its home shard, where its record lives, and its participants) is planned the same way under the
        other (``RAFTKV.TXN ... RING tag``, raftkv.server.commands.txn)."""
        return f"{self.nshards}.{max((self.born.get(s, 0) for s in range(self.nshards)), default=0)}"

    def incarnation(self, shard: int) -> int:
        """The epoch at which ``shard``'s group was created (``born``; 0: in the cluster's first map)."""
        return self.born.get(shard, 0)

    def shard_for_key(self, key: bytes | str) -> int:
        """The shard owning ``key`` (consistent hashing over shards 0..nshards-1)."""
        return self.ring.shard_for(key)

    def replicas(self, shard: int) -> list[NodeInfo]:
        """The nodes holding ``shard``, in placement order."""
        names = self.placement.get(shard)
        if names is None:
            raise ShardMapError(f"unknown shard {shard!r}: shards are 0..{len(self.groups) - 1}")
        return [self.nodes[n] for n in names]

    def shards_on(self, node: str) -> list[int]:
        """The shards with a replica on ``node``, ascending."""
        if node not in self.nodes:
            raise ShardMapError(f"unknown node {node!r} (nodes: {', '.join(sorted(self.nodes))})")
        return [s for s, names in self.placement.items() if node in names]

    def node_data_dir(self, node: str) -> str:
        """The directory where ``node`` keeps its journals: ``data_dir/<node>``."""
        if node not in self.nodes:
            raise ShardMapError(f"unknown node {node!r} (nodes: {', '.join(sorted(self.nodes))})")
        return os.path.join(self.data_dir, node)

    def node_for_raft_addr(self, addr: str) -> str | None:
        """Reverse lookup of a ``host:port`` Raft address (literal host match); None if unknown."""
        return self._raft_addr_index.get(addr)

    def with_epoch(self, epoch: int) -> ShardMap:
        """A copy with a new epoch; epochs only go up, so ``epoch`` must exceed the current one."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch <= self.epoch:
            raise ShardMapError(f"new epoch must be an integer > {self.epoch}, got {epoch!r}")
        return dataclasses.replace(self, epoch=epoch)

    # -- TOML -------------------------------------------------------------------

    @classmethod
    def from_dict(
        cls, d: Mapping[str, Any], base_dir: str | None = None, *, source: str = "cluster.toml",
        newer_tables: bool = False,
    ) -> ShardMap:
        """Build from a parsed cluster file; a relative ``data_dir`` is joined to ``base_dir`` if given.

        ``source`` prefixes error messages (``load`` passes the file path). ``newer_tables``: leave out top-level
        tables this build does not know instead of refusing the map: for a client reading a node's map, to which
        a newer build may have added one (clients only route by the map; the node they reach routes by its own).
        A file an operator wrote stays strict: a misspelt table is an error there.
        """
        if newer_tables:
            d = {k: v for k, v in d.items() if k in _TABLES}
        try:
            return cls._from_dict(d, base_dir)
        except ShardMapError as e:
            raise ShardMapError(f"{source}: {e}") from None

    @classmethod
    def _from_dict(cls, d: Mapping[str, Any], base_dir: str | None) -> ShardMap:
        _reject_unknown(d, _TABLES, "")
        security = dict(_table(d, "security", required=False))
        _reject_unknown(security, _SECURITY_KEYS, "security")
        for key in ("secret", "node_key", "password", "tls_cert", "tls_key"):
            if key in security:
                _check_str(security[key], f"security.{key}")
        users = security.get("users", {})
        if not isinstance(users, Mapping) or not all(isinstance(v, str) and v for v in users.values()):
            raise ShardMapError("security.users must be a table of user = \"password\"")
        cluster = _table(d, "cluster", required=True)
        _reject_unknown(cluster, _CLUSTER_KEYS, "cluster")
        raw_nodes = _table(d, "nodes", required=True)
        if not raw_nodes:
            raise ShardMapError("nodes is empty: add at least one [nodes.<name>] table")
        nodes = {name: _node_from_dict(name, raw) for name, raw in raw_nodes.items()}
        nshards = _check_int(_required(cluster, "shards", "cluster"), "cluster.shards", 1, SHARDS_MAX)
        placement = _placement_from_dict(_table(d, "placement", required=False))
        born = _born_from_dict(_table(d, "born", required=False))
        leases_moved = _shard_ints(_table(d, "leases_moved", required=False), "leases_moved", "a sequence number")
        adding = cluster.get("adding")
        removing = cluster.get("removing")
        if "replication" in cluster:
            replication = cluster["replication"]
        elif placement and len({len(v) for v in placement.values()}) == 1:
            replication = len(next(iter(placement.values())))  # implied by an explicit placement
        else:
            replication = min(3, len(nodes))
        _check_int(replication, "cluster.replication", 1, NODES_MAX)
        if replication > len(nodes):
            raise ShardMapError(
                f"cluster.replication = {replication} but only {len(nodes)} node(s) are defined"
            )
        if not placement:
            placement = _default_placement(list(nodes), nshards, replication)
            if adding is not None:
                raise ShardMapError("cluster.adding needs an explicit [placement] for the shard being added")
        data_dir = _check_str(_required(cluster, "data_dir", "cluster"), "cluster.data_dir")
        if base_dir is not None and not os.path.isabs(data_dir):
            data_dir = os.path.normpath(os.path.join(base_dir, data_dir))
        return cls(
            name=cluster.get("name", "raftkv"),
            epoch=cluster.get("epoch", 1),
            nshards=nshards,
            vnodes=cluster.get("vnodes", DEFAULT_VNODES),
            replication=replication,
            data_dir=data_dir,
            nodes=nodes,
            placement=placement,
            security=security,
            adding=adding,
            removing=removing,
            born=born,
            leases_moved=leases_moved,
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ShardMap:
        """Read and validate a cluster file; a relative data_dir is relative to the file's directory."""
        path = os.fspath(path)
        try:
            with open(path, "rb") as f:
                parsed = tomllib.load(f)
        except FileNotFoundError:
            raise ShardMapError(f"{path}: cluster file not found (run `raftkv cluster up`?)") from None
        except tomllib.TOMLDecodeError as e:
            raise ShardMapError(f"{path}: not valid TOML: {e}") from None
        return cls.from_dict(parsed, os.path.dirname(os.path.abspath(path)), source=path)

    def to_toml(self, include_secrets: bool = True) -> str:
        """The cluster file text; ``from_dict(tomllib.loads(m.to_toml())) == m``.

        ``include_secrets=False`` leaves out ``[security]`` (what nodes send to clients).
        """
        lines = [
            "# raftkv cluster file (shards.shardmap); raft_port is the node's Raft port, its shard s member is host:(raft_port + s)",
            "[cluster]",
            f"name = {_toml_str(self.name)}",
            f"epoch = {self.epoch}",
            f"shards = {self.nshards}",
            f"vnodes = {self.vnodes}",
            f"replication = {self.replication}",
            f"data_dir = {_toml_str(self.data_dir)}",
        ]
        if self.adding is not None:
            lines.append(f"adding = {self.adding}")
        if self.removing is not None:
            lines.append(f"removing = {self.removing}")
        lines += [
            "",
            "[placement]",
        ]
        lines += [
            f'"{s}" = [{", ".join(_toml_str(n) for n in names)}]' for s, names in self.placement.items()
        ]
        if self.born:
            lines += ["", "[born]"] + [f'"{s}" = {b}' for s, b in self.born.items()]
        if self.leases_moved:
            lines += ["", "[leases_moved]"] + [f'"{s}" = {n}' for s, n in self.leases_moved.items()]
        for info in sorted(self.nodes.values(), key=lambda n: n.name):
            lines += ["", f"[nodes.{_toml_key(info.name)}]", f"host = {_toml_str(info.host)}"]
            lines += [f"client_port = {info.client_port}", f"raft_port = {info.raft_port}"]
            if info.metrics_port is not None:
                lines.append(f"metrics_port = {info.metrics_port}")
        if include_secrets and self.security:
            lines += ["", "[security]"]
            for key in _SECURITY_KEYS:
                if key in self.security and key != "users":
                    lines.append(f"{key} = {_toml_str(self.security[key])}")
            if self.security.get("users"):
                lines += ["", "[security.users]"]
                lines += [f"{_toml_key(u)} = {_toml_str(p)}" for u, p in sorted(self.security["users"].items())]
        return "\n".join(lines) + "\n"

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the cluster file atomically (temp file, fsync, rename, fsync directory)."""
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        tmp = f"{path}.tmp.{os.getpid()}"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(self.to_toml())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# -- TOML reading helpers ------------------------------------------------------


def _required(table: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in table:
        raise ShardMapError(f"{where}.{key} missing")
    return table[key]


def _table(d: Mapping[str, Any], key: str, *, required: bool) -> Mapping[str, Any]:
    if key not in d:
        if required:
            raise ShardMapError(f"[{key}] table missing")
        return {}
    value = d[key]
    if not isinstance(value, Mapping):
        raise ShardMapError(f"{key} must be a table, got {value!r}")
    return value


def _reject_unknown(table: Mapping[str, Any], known: tuple[str, ...], where: str) -> None:
    for key in table:
        if key not in known:
            name = f"{where}.{key}" if where else f"[{key}]"
            raise ShardMapError(f"unknown key {name} (known: {', '.join(known)})")


def _node_from_dict(name: str, raw: Any) -> NodeInfo:
    where = f"nodes.{name}"
    if not isinstance(raw, Mapping):
        raise ShardMapError(f"{where} must be a table, got {raw!r}")
    _reject_unknown(raw, _NODE_KEYS, where)
    return NodeInfo(
        name=name,
        host=_required(raw, "host", where),
        client_port=_required(raw, "client_port", where),
        raft_port=_required(raw, "raft_port", where),
        metrics_port=raw.get("metrics_port"),
    )


def _placement_from_dict(raw: Mapping[str, Any]) -> dict[int, tuple[str, ...]]:
    placement: dict[int, tuple[str, ...]] = {}
    for key, names in raw.items():
        if not re.fullmatch(r"[0-9]+", key):
            raise ShardMapError(f'placement key {key!r} must be a shard id such as "0"')
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ShardMapError(f"placement.{key} must be a list of node names, got {names!r}")
        placement[int(key)] = tuple(names)
    return placement


def _born_from_dict(raw: Mapping[str, Any]) -> dict[int, int]:
    return _shard_ints(raw, "born", "an epoch")


def _shard_ints(raw: Mapping[str, Any], table: str, what: str) -> dict[int, int]:
    """A table of shard id -> integer (``[born]``, ``[leases_moved]``)."""
    out: dict[int, int] = {}
    for key, n in raw.items():
        if not re.fullmatch(r"[0-9]+", key):
            raise ShardMapError(f'{table} key {key!r} must be a shard id such as "3"')
        if not isinstance(n, int) or isinstance(n, bool):
            raise ShardMapError(f"{table}.{key} must be {what} (an integer), got {n!r}")
        out[int(key)] = n
    return out


# -- TOML writing helpers (a tiny subset: strings, ints, string arrays) ----------


def _toml_str(value: str) -> str:
    out = []
    for ch in value:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_key(key: str) -> str:
    return key if _BARE_KEY_RE.fullmatch(key) else _toml_str(key)


def _node_hosts(n_nodes: int, per_node_hosts: bool, host_prefix: str) -> Iterator[str]:
    for i in range(1, n_nodes + 1):
        yield f"{host_prefix}{i}" if per_node_hosts else "127.0.0.1"


def local_cluster(
    n_nodes: int = 3,
    n_shards: int = 3,
    base_port: int = 7001,
    data_dir: str = ".raftkv/data",
    host_prefix: str = "127.0.0.",
    *,
    per_node_hosts: bool = False,
    replication: int | None = None,
    vnodes: int = DEFAULT_VNODES,
    name: str = "raftkv",
    epoch: int = 1,
) -> ShardMap:
    """A loopback cluster: nodes n1..nN, default placement.

    Node ``i`` (1-based) gets ``client_port = base_port + i - 1``,
    ``metrics_port = base_port + 500 + i - 1`` and
    ``raft_port = base_port + 1000 + (i - 1) * 100``, so nodes never overlap for up
    to 100 shards and 500 nodes. Hosts are all ``127.0.0.1``, or
    ``f"{host_prefix}{i}"`` with ``per_node_hosts=True`` (per-node loopback
    addresses for the fault harness). ``data_dir`` is kept as given: pass an
    absolute path if the map will be saved, because ``load`` resolves a relative
    one against the cluster file's directory.
    """
    _check_int(n_nodes, "n_nodes", 1, min(NODES_MAX, 500))
    _check_int(n_shards, "n_shards", 1, 100)
    _check_int(base_port, "base_port", PORT_MIN, PORT_MAX - 1000 - (n_nodes - 1) * 100 - n_shards)
    hosts = list(_node_hosts(n_nodes, per_node_hosts, host_prefix))
    nodes = {
        f"n{i}": NodeInfo(
            name=f"n{i}",
            host=hosts[i - 1],
            client_port=base_port + i - 1,
            raft_port=base_port + 1000 + (i - 1) * 100,
            metrics_port=base_port + 500 + i - 1,
        )
        for i in range(1, n_nodes + 1)
    }
    replication = min(3, n_nodes) if replication is None else replication
    if replication > n_nodes:
        raise ShardMapError(f"replication = {replication} but only {n_nodes} node(s)")
    return ShardMap(
        name=name,
        epoch=epoch,
        nshards=n_shards,
        vnodes=vnodes,
        replication=replication,
        data_dir=data_dir,
        nodes=nodes,
        placement=_default_placement(list(nodes), n_shards, replication),
    )
