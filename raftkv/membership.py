"""Membership changes and leader balancing: ``raftkv node add|remove|replace``, ``raftkv leaders balance``.

Theory of operation
-------------------
Every shard is its own Raft group, so a node joins or leaves the cluster by
joining or leaving each of its shard groups, **one server at a time**
(pysyncobj's single-server dynamic membership; a change takes effect when it
is appended and a second one is refused until the first commits).  The CLI
drives the change; the shard leaders apply it:

``RAFTKV.MEMBER shard ADD|REMOVE raft_addr``
    on the shard's leader (forwarded there), ``addNodeToCluster`` /
    ``removeNodeFromCluster`` on the Raft tick thread; answers once the change
    has committed.  Idempotent: adding a member or removing a non-member is OK.
    A leader asked to remove itself hands leadership to another member first
    and answers ``-TRYAGAIN``.
``RAFTKV.MEMBER shard LIST``
    the group's members as the shard leader sees them.
``RAFTKV.MAP toml``
    install a newer shard map (higher epoch) in a running node, so it routes to
    and reports new members; the CLI pushes it to every node after a change.

* ``node add HOST:PORT``: write the cluster file (epoch + 1, the node added to
  every shard's placement, replication + 1), add the node to every shard group
  (3 -> 4 members: quorum 3, all old members are up), start it (local
  clusters) with the existing members as peers, push the map, wait until it
  has caught up.
* ``node add HOST:PORT --empty`` (``join=False``): the node joins no group; it is
  written into the file, started and sent the map; ``raftkv rebalance``
  (``raftkv.rebalance``) then moves replicas onto it.
* ``node remove NAME``: a node holding every shard leaves every shard group
  (leadership moves away first); the file is written (replication - 1), the
  map pushed, the node stopped.  A node holding no replica (after
  ``raftkv rebalance --drain NAME``) only leaves the file and is stopped.
* ``node replace OLD HOST:PORT`` (a dead machine): per shard, remove OLD first
  (3 -> 2 members, both up: quorum 2) then add NEW (2 -> 3, quorum 2, so the
  group stays writable even before NEW has caught up); the file is written
  first so NEW starts with the right peers.  NEW gets a new name and an empty
  data directory and catches up from the leaders (log or snapshot).

Every step is idempotent, so a command that died half-way is simply run again.
Clients discover the change through ``RAFTKV.CLUSTER`` (``raftkv.Client``
refetches the map when a leader it hears of is not in its map).

Leader balancing: ``plan_balance`` moves leadership from the node leading the
most shards to the least loaded replica of that shard while that narrows the
spread; ``raftkv leaders balance`` runs the plan with ``RAFTKV.TRANSFER``.
With ``raftkv serve --balance-leaders`` each node checks every
``--balance-period`` seconds (default 5; ``raftkv.server.balancer``) and, once every shard has had the
same leader for two checks (the cluster has settled after a failover), hands
away the shards the plan takes from it, one per check.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger("raftkv.membership")



class MembershipError(Exception):
    """A membership change or balancing step could not be done; the message says why."""


# -- pure planning --------------------------------------------------------------------------

def plan_balance(leaders: Mapping[int, str | None], placement: Mapping[int, tuple[str, ...]],
                 nodes: list[str]) -> list[tuple[int, str, str]]:
    """Leadership moves ``(shard, from, to)`` that spread leaders evenly over ``nodes``.

    Only nodes in ``nodes`` (e.g. the live ones) receive leadership, and only for shards
    they hold a replica of.  Each move takes a shard from a node leading the most shards
    to the least-loaded eligible replica when that narrows the gap by at least two.
    """
    count = {n: 0 for n in nodes}
    led = {s: n for s, n in leaders.items() if n is not None}
    for n in led.values():
        count[n] = count.get(n, 0) + 1
    moves: list[tuple[int, str, str]] = []
    while True:
        best = None
        for s in sorted(led):
            src = led[s]
            cands = [n for n in placement.get(s, ()) if n in nodes and n != src]
            if not cands:
                continue
            dst = min(cands, key=lambda n: (count[n], n))
            gain = count[src] - count[dst]
            if gain >= 2 and (best is None or gain > best[0]):
                best = (gain, s, src, dst)
        if best is None:
            return moves
        _, s, src, dst = best
        moves.append((s, src, dst))
        led[s] = dst
        count[src] -= 1
        count[dst] += 1


def map_add(m: Any, info: Any, join: bool = True) -> Any:
    """The map with node ``info`` added, epoch + 1: to every shard (replication + 1) if ``join``,
    else to no shard (``raftkv rebalance`` then moves replicas onto it)."""
    from shards.shardmap import ShardMapError

    if info.name in m.nodes:
        raise ShardMapError(f"node {info.name} is already in the cluster file")
    nodes = {**m.nodes, info.name: info}
    if not join:
        return dataclasses.replace(m, epoch=m.epoch + 1, nodes=nodes)
    placement = {s: (*names, info.name) for s, names in m.placement.items()}
    return dataclasses.replace(m, epoch=m.epoch + 1, nodes=nodes, placement=placement,
                               replication=m.replication + 1)


def map_remove(m: Any, name: str) -> Any:
    """The map without ``name``, epoch + 1.

    A drained node (no replica left, ``raftkv rebalance --drain``) just leaves: replication stays. A
    node holding every shard leaves every group: replication - 1. A node holding some shards is
    refused: removing it would leave those shards with fewer replicas than the others.
    """
    from shards.shardmap import ShardMapError

    if name not in m.nodes:
        raise ShardMapError(f"unknown node {name!r} (nodes: {', '.join(sorted(m.nodes))})")
    if len(m.nodes) == 1:
        raise ShardMapError("cannot remove the last node")
    held = [s for s, names in m.placement.items() if name in names]
    if held and len(held) != len(m.placement):
        raise ShardMapError(f"{name} still holds replicas of shard(s) {held}: move them off first with "
                            f"'raftkv rebalance --drain {name}', or swap the node for a new one with "
                            "'raftkv node replace'")
    if any(names == (name,) for names in m.placement.values()):
        raise ShardMapError(f"{name} holds the only replica of a shard: add replicas elsewhere first "
                            "('raftkv rebalance')")
    nodes = {n: i for n, i in m.nodes.items() if n != name}
    placement = {s: tuple(n for n in names if n != name) for s, names in m.placement.items()}
    replication = min(m.replication - 1 if held else m.replication, len(nodes))
    return dataclasses.replace(m, epoch=m.epoch + 1, nodes=nodes, placement=placement,
                               replication=max(1, replication))


def map_replace(m: Any, old: str, info: Any) -> Any:
    """The map with ``old`` swapped for node ``info`` in every placement, epoch + 1."""
    from shards.shardmap import ShardMapError

    if old not in m.nodes:
        raise ShardMapError(f"unknown node {old!r} (nodes: {', '.join(sorted(m.nodes))})")
    if info.name in m.nodes:
        raise ShardMapError(f"node {info.name} is already in the cluster file")
    nodes = {n: i for n, i in m.nodes.items() if n != old}
    nodes[info.name] = info
    placement = {s: tuple(info.name if n == old else n for n in names) for s, names in m.placement.items()}
    return dataclasses.replace(m, epoch=m.epoch + 1, nodes=nodes, placement=placement)


# -- CLI side --------------------------------------------------------------------------------------

def _parse_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise MembershipError(f"bad address {address!r}: want HOST:CLIENT_PORT")
    return host, int(port)


def _new_node_info(m: Any, address: str, name: str | None, raft_port: int | None,
                   metrics_port: int | None) -> Any:
    from raftkv.cluster import _port_free
    from shards.shardmap import NodeInfo

    host, client_port = _parse_address(address)
    if name is None:
        i = len(m.nodes) + 1
        while f"n{i}" in m.nodes:
            i += 1
        name = f"n{i}"
    if raft_port is None:
        # Default: the next 100-port block after every existing node's raft ports, free on this host.
        raft_port = max(n.raft_port for n in m.nodes.values()) + 100
        local = host in ("127.0.0.1", "localhost") or host.startswith("127.")
        while local and not all(_port_free(host, raft_port + s) for s in range(m.nshards)):
            raft_port += 100
    return NodeInfo(name=name, host=host, client_port=client_port, raft_port=raft_port,
                    metrics_port=metrics_port)


class Operator:
    """Drives membership changes and balancing against a cluster file (what the CLI runs)."""

    def __init__(self, cluster_file: str | os.PathLike, timeout: float = 30.0, say: Any = None,
                 client_kw: dict | None = None) -> None:
        from shards.shardmap import ShardMap

        self.path = os.fspath(cluster_file)
        self.map = ShardMap.load(self.path)
        self.timeout = timeout
        self.say = say or (lambda _msg: None)
        self.client_kw = client_kw or {}
        self._refresh()

    def _call(self, addr: tuple[str, int], *args: Any, timeout: float = 2.0) -> Any:
        """One command to one node, authenticated (and over TLS) as the cluster file says."""
        from raftkv.cluster import call
        from raftkv.security import Security

        sec = Security.from_config(self.map.security)
        return call(addr, *args, timeout=timeout, auth=sec.peer_credentials(), tls=sec.peer_ssl())

    def _client(self) -> Any:
        from raftkv.client import Client

        return Client(cluster=self.map, timeout=self.timeout, **self.client_kw)

    def _save(self, m: Any, verbose: bool = True) -> None:
        """Make ``m`` the cluster's map: a compare-and-set on the epoch this command read
        (``raftkv.mapregister``), then the cluster file (a cache the next command starts from)."""
        self._cas(m)
        m.save(self.path)
        self.map = m
        if verbose:
            self.say(f"cluster file {self.path}: epoch {m.epoch}")

    def _register(self) -> Any:
        """The cluster's map register through the first node that answers: ``(epoch, text)``, None (empty),
        or ``False`` (no node answered, or they predate the register)."""
        from raftkv.protocol import ReplyError

        for info in self.map.nodes.values():
            try:
                reply = self._call(info.client_addr, "RAFTKV.MAPGET", timeout=5.0)
            except (OSError, ConnectionError):
                continue
            if not isinstance(reply, ReplyError):
                return None if reply is None else (int(reply[0]), reply[1].decode())  # type: ignore[index]
        return False

    def _refresh(self) -> None:
        """Start from the cluster's map, not the file, when they differ: the register is the authority."""
        from shards.shardmap import ShardMap

        reg = self._register()
        if not reg or reg[1] == self._public_map(self.map).to_toml():
            return
        import tomllib

        m = ShardMap.from_dict(tomllib.loads(reg[1]), os.path.dirname(os.path.abspath(self.path)),
                               source="the cluster's map")
        m = dataclasses.replace(m, security=self.map.security)  # the register never holds secrets
        self.say(f"{self.path} is at epoch {self.map.epoch}, the cluster's map at epoch {m.epoch}: using the "
                 "cluster's (the file is rewritten)")
        m.save(self.path)
        self.map = m

    def _cas(self, m: Any) -> None:
        from raftkv.protocol import ReplyError

        text = self._public_map(m).to_toml()
        deadline = time.monotonic() + self.timeout
        last: object = "no node reachable"
        while time.monotonic() < deadline:
            for info in self.map.nodes.values():
                try:
                    reply = self._call(info.client_addr, "RAFTKV.MAPCAS", str(self.map.epoch), text, timeout=15.0)
                except (OSError, ConnectionError) as e:
                    last = e
                    continue
                if not isinstance(reply, ReplyError):
                    return
                if reply.code == "MAPCHANGED":
                    raise MembershipError(f"not changed: {reply.message.partition(' ')[2]}") from None
                if reply.code == "ERR" and "unknown command" in reply.message.lower():
                    self.say("the nodes predate the replicated shard map: the change is saved to the cluster "
                             "file only (upgrade every node, then run the command again)")
                    return
                last = reply  # no leader of the map's shard yet, or an unknown outcome: resend (idempotent)
            time.sleep(0.2)
        raise MembershipError(f"could not change the cluster's map to epoch {m.epoch} ({last}); nothing else was "
                              "changed by this step: run the command again")

    def _member(self, shard: int, action: str, addr: str, verbose: bool = True) -> None:
        from raftkv.client import RaftKVError

        with self._client() as c:
            try:
                c._request(shard, [b"RAFTKV.MEMBER", str(shard).encode(), action.encode(), addr.encode()],
                           write=False)
            except RaftKVError as e:
                raise MembershipError(f"shard {shard}: {action.lower()} {addr} failed: {e}; the command is "
                                      "idempotent, run it again") from None
        if verbose:
            self.say(f"shard {shard}: {action.lower()} {addr}: committed")

    def members(self, shard: int) -> list[str]:
        with self._client() as c:
            return sorted(x.decode() for x in c._request(shard, [b"RAFTKV.MEMBER", str(shard).encode(),
                                                                 b"LIST"], write=False))

    def push_map(self, verbose: bool = True) -> list[str]:
        """Install the current map in every reachable node; returns the nodes that could not be reached.

        A node starts or stops its shard groups as the map's placement says (``Node.install_map``).
        """
        from raftkv.protocol import ReplyError

        text = self._public_map().to_toml()
        missed = []
        for name, info in self.map.nodes.items():
            try:
                reply = self._call(info.client_addr, "RAFTKV.MAP", text, timeout=15.0)
            except (OSError, ConnectionError) as e:
                reply = e
            if isinstance(reply, (OSError, ConnectionError, ReplyError)):
                missed.append(name)
                self.say(f"{name}: map not installed ({reply}); it reads the cluster file when it starts")
            elif verbose:
                self.say(f"{name}: map epoch {reply}")
        return missed

    def _public_map(self, m: Any = None) -> Any:
        m = self.map if m is None else m
        if getattr(m, "security", None):
            return dataclasses.replace(m, security={})
        return m

    def _local_cluster(self) -> Any:
        from raftkv.cluster import LocalCluster

        return LocalCluster(os.path.dirname(os.path.abspath(self.path)))

    def statuses(self) -> dict[str, dict]:
        """Node name -> its ``RAFTKV.STATUS`` (unreachable nodes are left out)."""
        import json

        out = {}
        for name, info in self.map.nodes.items():
            try:
                out[name] = json.loads(self._call(info.client_addr, "RAFTKV.STATUS", timeout=2.0))  # type: ignore[arg-type]
            except (OSError, ConnectionError, ValueError, TypeError):
                continue
        return out

    @staticmethod
    def leader_view(statuses: dict[str, dict], shard: int) -> tuple[str, int] | None:
        """``(leader node, its commit index)`` of ``shard`` in the highest term reported, or None."""
        best: tuple[int, str, int] | None = None
        for name, st in statuses.items():
            sh = st.get("shards", {}).get(str(shard))
            if sh and sh.get("role") == "leader" and (best is None or sh["term"] > best[0]):
                best = (sh["term"], name, sh["commit_idx"])
        return None if best is None else (best[1], best[2])

    @staticmethod
    def applied(statuses: dict[str, dict], node: str, shard: int) -> int | None:
        """``node``'s applied index of ``shard`` (None: unreachable, or it does not host the shard)."""
        sh = statuses.get(node, {}).get("shards", {}).get(str(shard))
        return None if sh is None else sh.get("last_applied")

    def _wait_applied(self, shards: list[int], enough: Callable[[dict[str, dict], int, int], bool],
                      timeout: float, failure: Callable[[list[int]], str]) -> None:
        """Poll the nodes until ``enough(statuses, shard, target)`` holds for every shard, ``target`` being the
        shard leader's commit index first seen after this call; else raise ``MembershipError(failure(behind))``.
        """
        deadline = time.monotonic() + timeout
        targets: dict[int, int] = {}
        while True:
            st = self.statuses()
            for s in shards:
                view = self.leader_view(st, s)
                if s not in targets and view is not None:
                    targets[s] = view[1]
            behind = sorted(s for s in shards if s not in targets or not enough(st, s, targets[s]))
            if not behind:
                return
            if time.monotonic() > deadline:
                raise MembershipError(failure(behind))
            time.sleep(0.1)

    def wait_caught_up(self, name: str, timeout: float | None = None) -> None:
        """Until ``name`` has applied, for each of its shards, the leader's commit index as of this call.

        Knowing a leader is not enough: a member still installing a snapshot cannot help a majority
        commit, so a change that counts on it (removing another member) would stall the group.
        """
        limit = timeout or self.timeout
        self._wait_applied(
            self.map.shards_on(name), lambda st, s, target: (self.applied(st, name, s) or -1) >= target, limit,
            lambda behind: f"{name} did not catch up within {limit:.0f} s (shards {behind}; see its log)")

    def wait_others_caught_up(self, name: str, timeout: float | None = None) -> None:
        """Until, in every shard ``name`` holds, a majority of the *other* members has applied the leader's
        commit index as of this call: removing ``name`` while one of them still installs a snapshot leaves a
        configuration whose majority cannot commit (its leader steps down; seen in the member nemesis)."""
        limit = timeout or self.timeout

        def majority(st: dict[str, dict], s: int, target: int) -> bool:
            rest = [n for n in self.map.placement[s] if n != name]
            return sum((self.applied(st, n, s) or -1) >= target for n in rest) > len(rest) // 2

        self._wait_applied(
            self.map.shards_on(name), majority, limit,
            lambda behind: f"not removing {name}: in shard(s) {behind} fewer than a majority of the other members "
                           f"caught up within {limit:.0f} s (see 'raftkv status' and the nodes' logs); the command "
                           "is idempotent, run it again")

    # -- the operations -----------------------------------------------------------------------------
    def add(self, address: str, name: str | None = None, raft_port: int | None = None,
            metrics_port: int | None = None, start: bool = True, join: bool = True) -> str:
        """Add a node: a member of every shard group, or (``join=False``) of none until a rebalance."""
        info = _new_node_info(self.map, address, name, raft_port, metrics_port)
        existing = self.map.nodes.get(info.name)
        if existing is None:
            self._save(map_add(self.map, info, join))
        elif (existing.host, existing.client_port) != (info.host, info.client_port):
            raise MembershipError(f"{info.name} is already in the cluster file with another address")
        info = self.map.nodes[info.name]
        for s in self.map.shards_on(info.name):
            self._member(s, "ADD", info.raft_addr(s))
        self._announce(info.name, start)
        return info.name

    def _announce(self, name: str, start: bool) -> None:
        """After a node joined the groups: start it here (if asked), push the map, wait for it."""
        if start:
            self._local_cluster().start_node(name)
            deadline = time.monotonic() + self.timeout
            while not self._reachable(name) and time.monotonic() < deadline:
                time.sleep(0.1)  # it reads the file when it starts; the push below is for the others
            self.say(f"{name}: started")
        self.push_map()
        if start:
            self.wait_caught_up(name)

    def remove(self, name: str, stop: bool = True) -> None:
        """Remove ``name``: from every shard group if it holds every shard, else it must be drained."""
        new = map_remove(self.map, name)
        info = self.map.nodes[name]
        self.wait_others_caught_up(name)
        for s in self.map.shards_on(name):
            self._member(s, "REMOVE", info.raft_addr(s))
        self._save(new)
        self.push_map()
        if stop:
            self._local_cluster().stop_node(name)
            self.say(f"{name}: stopped")

    def replace(self, old: str, address: str, name: str | None = None, raft_port: int | None = None,
                metrics_port: int | None = None, start: bool = True) -> str:
        if old in self.map.nodes:
            old_info = self.map.nodes[old]
            info = _new_node_info(self.map, address, name, raft_port, metrics_port)
            data = os.path.join(self.map.data_dir, info.name)
            if os.path.isdir(data) and os.listdir(data):
                raise MembershipError(f"{data} is not empty: a replacement node starts with no data")
            shards = self.map.shards_on(old)
            self._save(map_replace(self.map, old, info))  # first, so NEW starts with the right peers
        else:  # a re-run after the file was written: finish the group changes
            if name is None or name not in self.map.nodes:
                raise MembershipError(f"{old} is not in the cluster file; to finish an interrupted replace, "
                                      "run it again with --name NEW_NAME")
            info = self.map.nodes[name]
            old_info, shards = None, self.map.shards_on(name)
        for s in shards:
            if old_info is not None:
                self._member(s, "REMOVE", old_info.raft_addr(s))  # first: the dead node never counts
            self._member(s, "ADD", info.raft_addr(s))
        self._announce(info.name, start)
        return info.name

    def leaders(self) -> dict[int, str | None]:
        """Shard -> leader in the highest term any reachable node reports."""
        best: dict[int, tuple[int, str]] = {}
        with self._client() as c:
            for name, st in c.node_status().items():
                for s, sh in st.get("shards", {}).items():
                    if sh.get("role") == "leader" and (int(s) not in best or sh["term"] > best[int(s)][0]):
                        best[int(s)] = (sh["term"], name)
        return {s: (best[s][1] if s in best else None) for s in range(self.map.nshards)}

    def balance(self, rounds: int = 3) -> list[tuple[int, str, str]]:
        """Spread shard leaders evenly over the live nodes; returns the moves made."""

        done: list[tuple[int, str, str]] = []
        for _ in range(rounds):
            leaders = self.leaders()
            live = sorted({n for n in self.map.nodes if self._reachable(n)})
            moves = plan_balance(leaders, self.map.placement, live)
            if not moves:
                return done
            for s, src, dst in moves:
                deadline = time.monotonic() + 10.0
                while True:
                    try:
                        self._call(self.map.nodes[src].client_addr, "RAFTKV.TRANSFER", str(s), dst, timeout=5.0)
                    except (OSError, ConnectionError):
                        pass
                    time.sleep(0.3)
                    if self.leaders().get(s) == dst:
                        self.say(f"shard {s}: leader {src} -> {dst}")
                        done.append((s, src, dst))
                        break
                    if time.monotonic() > deadline:
                        self.say(f"shard {s}: could not move leadership {src} -> {dst} (will retry)")
                        break
        return done

    def _reachable(self, name: str) -> bool:

        try:
            self._call(self.map.nodes[name].client_addr, "PING", timeout=1.0)
            return True
        except (OSError, ConnectionError):
            return False
