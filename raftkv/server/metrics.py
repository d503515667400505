"""Prometheus metrics, ``/health`` and ``/ready`` for one node.

Raft figures (role, term, indexes, lag, journal sizes, fsync) are read from the
replicas when Prometheus scrapes (a custom collector), so they cost nothing on
the request path.  Request latencies, errors and proposal outcomes are counted
as they happen.  Every node has its own ``CollectorRegistry`` so that several
nodes (or tests) can live in one process.

HTTP is served by a tiny asyncio handler on the node's event loop (GET only):
``/metrics`` (text exposition format), ``/health`` (200 when every hosted
replica's tick thread is alive) and ``/ready`` (200 when every hosted shard has
a leader this node can reach).  Both answer a JSON body saying why.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from raftkv.server.api import NodeAPI as Node

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class NodeMetrics:
    """The metrics of one node (see module doc)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Histogram("raftkv_request_duration_seconds", "Client request latency by command",
                                  ["command"], buckets=LATENCY_BUCKETS, registry=r)
        self.errors = Counter("raftkv_errors_total", "Error replies by error code", ["code"], registry=r)
        self.proposals = Counter("raftkv_proposals_total",
                                 "State-machine commands proposed by this node, by outcome "
                                 "(applied / not_applied / unknown)", ["shard", "outcome"], registry=r)
        self.leader_changes = Counter("raftkv_raft_leader_changes_total",
                                      "Times this replica saw the shard's leader change", ["shard"], registry=r)
        self.txn_outcomes = Counter("raftkv_txn_outcomes_total",
                                    "Cross-shard transactions coordinated by this node, by outcome",
                                    ["outcome"], registry=r)
        self.audit = Counter("raftkv_audit_events_total",
                             "Administrative actions and refused authentications, by action and outcome",
                             ["action", "outcome"], registry=r)
        self.client_gone = Counter("raftkv_client_disconnects_total",
                                   "Client connections that closed before their replies were written",
                                   registry=r)
        self.connections = Gauge("raftkv_connections", "Open client connections", registry=r)
        self.connections.set_function(lambda: node.clients)
        r.register(_RaftCollector(node))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _RaftCollector:
    """Per-shard Raft state, read at scrape time."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[Any]:
        node = self.node
        role = GaugeMetricFamily("raftkv_raft_role", "Raft role: 0 follower, 1 candidate, 2 leader", labels=["shard"])
        is_leader = GaugeMetricFamily("raftkv_raft_is_leader", "1 if this replica believes it leads",
                                      labels=["shard"])
        has_leader = GaugeMetricFamily("raftkv_raft_has_leader", "1 if this replica knows a leader",
                                       labels=["shard"])
        term = GaugeMetricFamily("raftkv_raft_term", "Current Raft term", labels=["shard"])
        commit = GaugeMetricFamily("raftkv_raft_commit_index", "Raft commit index", labels=["shard"])
        applied = GaugeMetricFamily("raftkv_raft_applied_index", "Last applied log index", labels=["shard"])
        lag = GaugeMetricFamily("raftkv_raft_replica_lag_entries",
                                "Leader only: entries a peer's log is behind the leader's commit index",
                                labels=["shard", "peer"])
        peer_up = GaugeMetricFamily("raftkv_raft_peer_connected", "1 if the Raft connection to a peer is up",
                                    labels=["shard", "peer"])
        keys = GaugeMetricFamily("raftkv_keys", "Keys stored in this replica", labels=["shard"])
        ckpts = CounterMetricFamily("raftkv_checkpoints", "Checkpoints of the shard's state into the engine",
                                    labels=["shard"])
        ckpt_keys = CounterMetricFamily("raftkv_checkpoint_keys", "Keys written to the engine by checkpoints",
                                        labels=["shard"])
        pending = GaugeMetricFamily("raftkv_keys_since_checkpoint",
                                    "Keys written since the last checkpoint (held in memory until the next)",
                                    labels=["shard"])
        snaps_sent = CounterMetricFamily("raftkv_snapshots_sent", "Snapshot transfers started to lagging followers",
                                         labels=["shard"])
        snaps_installed = CounterMetricFamily("raftkv_snapshots_installed",
                                              "Snapshots received from a leader and installed", labels=["shard"])
        open_txns = GaugeMetricFamily("raftkv_txn_open", "Cross-shard transactions open in this shard "
                                      "(coordinator records not finished + prepared locks held)", labels=["shard"])
        txn_age = GaugeMetricFamily("raftkv_txn_oldest_age_seconds",
                                    "Age of the oldest open cross-shard transaction in this shard (0 if none)",
                                    labels=["shard"])
        fsync_count = CounterMetricFamily("raftkv_fsync", "Journal flushes (msync+fsync) of this replica",
                                          labels=["shard"])
        fsync_sum = CounterMetricFamily("raftkv_fsync_seconds", "Total time spent in journal flushes",
                                        labels=["shard"])
        fsync_max = GaugeMetricFamily("raftkv_fsync_max_seconds", "Slowest journal flush so far", labels=["shard"])
        ticking = GaugeMetricFamily("raftkv_raft_ticking", "1 if the replica's tick thread is alive",
                                    labels=["shard"])
        for s, r in sorted(node.replicas.items()):
            sh = str(s)
            st = r.status()
            role.add_metric([sh], st["state"])
            is_leader.add_metric([sh], 1 if st["state"] == 2 else 0)
            has_leader.add_metric([sh], 0 if st.get("leader") is None else 1)
            term.add_metric([sh], st["raft_term"])
            commit.add_metric([sh], st["commit_idx"])
            applied.add_metric([sh], st["last_applied"])
            keys.add_metric([sh], st["keys"])
            for n in node.map.replicas(s):
                if n.name == node.name:
                    continue
                addr = n.raft_addr(s)
                peer_up.add_metric([sh, n.name], 1 if st.get(f"partner_node_status_server_{addr}") == 2 else 0)
                match = st.get(f"match_idx_server_{addr}")
                if st["state"] == 2 and match is not None:
                    lag.add_metric([sh, n.name], max(0, st["commit_idx"] - match))
            sn = r.snapshots.stats
            ckpts.add_metric([sh], sn["checkpoints"])
            ckpt_keys.add_metric([sh], sn["checkpoint_keys"])
            pending.add_metric([sh], r.state.data.pending())
            snaps_sent.add_metric([sh], sn["sent"])
            snaps_installed.add_metric([sh], sn["installs"])
            n_open, oldest = txn_summary(r.state.txns, r.log_now_ms())
            open_txns.add_metric([sh], n_open)
            txn_age.add_metric([sh], oldest)
            fs = r.flushStats()
            fsync_count.add_metric([sh], fs.count)
            fsync_sum.add_metric([sh], fs.total_s)
            fsync_max.add_metric([sh], fs.max_s)
            ticking.add_metric([sh], 1 if r.tick_thread_alive() else 0)
        yield from (role, is_leader, has_leader, term, commit, applied, lag, peer_up, keys, ckpts, ckpt_keys,
                    pending, snaps_sent, snaps_installed,
                    open_txns, txn_age, fsync_count, fsync_sum, fsync_max, ticking)
        yield from _engine_metrics(node.engine)
        tail = node.txns.tail
        batches = CounterMetricFamily("raftkv_txn_tail_batches", "tx_batch commands sent: the tail messages "
                                      "(settle, finish, ack) of several transactions to one shard")
        batches.add_metric([], tail.batches)
        batched = CounterMetricFamily("raftkv_txn_tail_batched_messages", "Tail messages sent inside those")
        batched.add_metric([], tail.messages)
        yield from (batches, batched)
        rc = node.reclaimer.stats()
        reclaimed = CounterMetricFamily("raftkv_engine_reclaimed_bytes", "Keys and values deleted from the engine "
                                        "for groups this node stopped hosting (raftkv.reclaim)")
        reclaimed.add_metric([], rc.bytes)
        reclaiming = GaugeMetricFamily("raftkv_engine_reclaims_pending", "Stopped groups whose engine data is "
                                       "still being deleted")
        reclaiming.add_metric([], len(node.reclaimer.pending()))
        yield from (reclaimed, reclaiming)
        disk = GaugeMetricFamily("raftkv_disk_free_ratio", "Free fraction of the data directory's filesystem")
        disk.add_metric([], disk_free_ratio(node.map.node_data_dir(node.name)))
        yield disk
        yield from _gc_metrics(node.heap.stats())


def _engine_metrics(engine: Any) -> Iterator[Any]:
    """The node's storage engine: its size and its durable commits (one per flush, covering every shard)."""
    st = engine.stats()
    size = GaugeMetricFamily("raftkv_engine_bytes",
                             "Size of the node's storage engine file (all shards' data and Raft logs)")
    size.add_metric([], engine.size_bytes())
    commits = CounterMetricFamily("raftkv_engine_commits", "Durable commits of the node's storage engine")
    commits.add_metric([], st.count)
    ops = CounterMetricFamily("raftkv_engine_commit_ops", "Writes carried by those commits (all shards)")
    ops.add_metric([], st.ops)
    secs = CounterMetricFamily("raftkv_engine_commit_seconds", "Total time spent in durable engine commits")
    secs.add_metric([], st.total_s)
    slowest = GaugeMetricFamily("raftkv_engine_commit_max_seconds", "Slowest durable engine commit so far")
    slowest.add_metric([], st.max_s)
    yield from (size, commits, ops, secs, slowest)


def txn_summary(txns: Any, now_ms: int) -> tuple[int, float]:
    """Open cross-shard transactions in one shard and the age (s) of the oldest.

    Open = coordinator records whose participants have not all finished, plus
    transactions prepared here (holding locks).  Racy read from outside the tick
    thread: good enough for monitoring.
    """
    starts = [r.created_ms for r in list(getattr(txns, "records", {}).values()) if not r.acked]
    starts += [p.since_ms for p in list(getattr(txns, "prepared", {}).values())]
    if not starts:
        return 0, 0.0
    return len(starts), max(0.0, (now_ms - min(starts)) / 1000.0) if now_ms else 0.0


def _gc_metrics(heap: dict) -> Iterator[Any]:
    """The garbage collector's work in this node process (``raftkv.heap``)."""
    runs = CounterMetricFamily("raftkv_gc_collections", "Garbage collections by generation", labels=["generation"])
    pause = CounterMetricFamily("raftkv_gc_pause_seconds", "Time every thread stood still in garbage collections, "
                                "by generation", labels=["generation"])
    longest = GaugeMetricFamily("raftkv_gc_pause_max_seconds", "Longest garbage collection so far, by generation",
                                labels=["generation"])
    for gen in range(3):
        runs.add_metric([str(gen)], heap["collections"][gen])
        pause.add_metric([str(gen)], heap["pause_s"][gen])
        longest.add_metric([str(gen)], heap["max_pause_ms"][gen] / 1000)
    frozen = GaugeMetricFamily("raftkv_gc_frozen_objects", "Objects moved out of the garbage collector's reach")
    frozen.add_metric([], heap["frozen_objects"])
    yield from (runs, pause, longest, frozen)


def disk_free_ratio(path: str) -> float:
    """Free fraction of the filesystem holding ``path`` (its nearest existing parent)."""
    p = os.path.abspath(path)
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    usage = shutil.disk_usage(p)
    return usage.free / usage.total if usage.total else 0.0


def health(node: Node) -> tuple[bool, dict]:
    """Process up and every hosted replica ticking."""
    dead = [s for s, r in node.replicas.items() if not r.tick_thread_alive()]
    return not dead, {"ok": not dead, "node": node.name, "replicas_not_ticking": dead}


def ready(node: Node) -> tuple[bool, dict]:
    """Every shard this node hosts has a leader this node can reach."""
    problems = {}
    for s, r in node.replicas.items():
        leader = r.leader_addr()
        if leader is None:
            problems[s] = "no leader"
        elif leader == r.self_addr():
            # A leader that lost its majority still believes it leads for a moment
            # (leaderFallbackTimeout): it is ready only while connected to a majority.
            peers = [a for a in r.member_addrs() if a != leader]
            connected = sum(1 for p in peers if r.peer_connected(p))
            if connected + 1 <= (len(peers) + 1) // 2:
                problems[s] = f"leads but reaches only {connected} of {len(peers)} peers (no majority)"
        elif not r.leader_reachable():
            problems[s] = f"leader {node.map.node_for_raft_addr(leader)} not reachable"
    return not problems, {"ok": not problems, "node": node.name, "shards_not_ready": problems}


async def serve_http(node: Node, metrics: NodeMetrics, host: str, port: int) -> asyncio.AbstractServer:
    """Start the metrics/health HTTP listener on the running loop."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5.0)
            while (await asyncio.wait_for(reader.readline(), 5.0)) not in (b"\r\n", b"\n", b""):
                pass
            parts = line.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) >= 2 else "/"
            if path == "/metrics":
                body, status, ctype = metrics.render(), 200, "text/plain; version=0.0.4; charset=utf-8"
            elif path in ("/health", "/ready"):
                ok, info = (health if path == "/health" else ready)(node)
                body, status, ctype = json.dumps(info).encode(), 200 if ok else 503, "application/json"
            else:
                body, status, ctype = b"not found: try /metrics, /health, /ready\n", 404, "text/plain"
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
            writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                         "Connection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, OSError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)
