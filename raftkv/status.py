"""Cluster health from the nodes' own reports: pure aggregation, no I/O.

``cluster_report(map, node_status, thresholds)`` takes each node's
``RAFTKV.STATUS`` (or an ``{"error": ...}`` entry for a node that did not
answer) and decides, per shard: who leads (the leader of the highest term any
replica reports), the term, the commit index, which replicas are up, how far
each lags, and which alert checks fire.  ``raftkv status`` renders it as a
table, ``raftkv alerts`` as a list; both exit non-zero when anything fires.

Alert checks (the same conditions as ``ops/prometheus-alerts.yml``):

=================  ========  ====================================================
check              severity  fires when
=================  ========  ====================================================
``no_quorum``      critical  fewer than a majority of a shard's replicas are up
``no_leader``      critical  a majority is up but no replica leads
``bare_majority``  warning   exactly a majority is up: one more failure = outage
``replica_lag``    warning   a replica's commit index trails by > ``lag_entries``
``flapping``       warning   > ``flaps_per_min`` leader changes in the last minute
``disk_full``      warning   a node's data disk has < ``disk_free_min`` free
``txn_stuck``      warning   a cross-shard transaction open for > ``txn_stuck_s``
``node_down``      warning   a node did not answer
``not_ticking``    critical  a replica's Raft tick thread died
=================  ========  ====================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shards.shardmap import ShardMap


@dataclass(frozen=True)
class Thresholds:
    """When the alert checks fire."""

    lag_entries: int = 1000
    flaps_per_min: int = 3
    disk_free_min: float = 0.10
    txn_stuck_s: float = 30.0


@dataclass(frozen=True)
class Alert:
    check: str
    severity: str  # "critical" or "warning"
    subject: str  # "shard 2", "node n3", ...
    message: str

    def line(self) -> str:
        return f"{self.severity.upper():8} {self.check:14} {self.subject}: {self.message}"


def cluster_report(m: ShardMap, node_status: dict[str, dict[str, Any]],
                   thresholds: Thresholds | None = None) -> dict[str, Any]:
    """The cluster's state, its alerts and a verdict: ``ok``, ``degraded`` or ``unavailable``."""
    th = thresholds or Thresholds()
    alerts: list[Alert] = []
    up_nodes = {n for n, st in node_status.items() if "error" not in st}
    for n in m.nodes:
        if n not in up_nodes:
            err = node_status.get(n, {}).get("error", "no answer")
            alerts.append(Alert("node_down", "warning", f"node {n}", f"not answering ({err})"))
    for n in sorted(up_nodes):
        free = node_status[n].get("disk_free_ratio")
        if free is not None and free < th.disk_free_min:
            alerts.append(Alert("disk_full", "warning", f"node {n}",
                                f"data disk {free:.0%} free (threshold {th.disk_free_min:.0%})"))
    shards = []
    for s in range(m.nshards):
        shards.append(_shard_report(m, s, node_status, up_nodes, th, alerts))
    if any(a.severity == "critical" for a in alerts):
        verdict = "unavailable"
    elif alerts:
        verdict = "degraded"
    else:
        verdict = "ok"
    nodes = {n: ("up" if n in up_nodes else "down: " + node_status.get(n, {}).get("error", "no answer"))
             for n in m.nodes}
    return {"verdict": verdict, "shards": shards, "nodes": nodes,
            "alerts": [a.__dict__ for a in alerts], "warnings": [a.line() for a in alerts]}


def _shard_report(m: ShardMap, s: int, node_status: dict, up_nodes: set, th: Thresholds,
                  alerts: list[Alert]) -> dict[str, Any]:
    subject = f"shard {s}"
    replicas = [n.name for n in m.replicas(s)]
    views = {n: node_status[n]["shards"][str(s)] for n in replicas
             if n in up_nodes and str(s) in node_status[n].get("shards", {})}
    up = list(views)
    term = max((v["term"] for v in views.values()), default=None)
    leader = next((n for n, v in views.items() if v["role"] == "leader" and v["term"] == term), None)
    commit = max((v["commit_idx"] for v in views.values()), default=None)
    quorum = len(replicas) // 2 + 1
    if len(up) < quorum:
        alerts.append(Alert("no_quorum", "critical", subject,
                            f"only {len(up)} of {len(replicas)} replicas up (need {quorum}); "
                            "the shard cannot serve reads or writes"))
    elif leader is None:
        alerts.append(Alert("no_leader", "critical", subject,
                            "a majority is up but no replica leads (election in progress or partition)"))
    elif len(up) == quorum and len(replicas) > 1:
        alerts.append(Alert("bare_majority", "warning", subject,
                            f"{len(up)} of {len(replicas)} replicas up; one more failure makes it unavailable"))
    lag = {n: commit - v["commit_idx"] for n, v in views.items()} if commit is not None else {}
    for n, behind in sorted(lag.items()):
        if behind > th.lag_entries:
            alerts.append(Alert("replica_lag", "warning", subject,
                                f"replica {n} is {behind} entries behind (threshold {th.lag_entries})"))
    flaps = max((v.get("leader_changes_1m", 0) for v in views.values()), default=0)
    if flaps > th.flaps_per_min:
        alerts.append(Alert("flapping", "warning", subject,
                            f"{flaps} leader changes in the last minute (threshold {th.flaps_per_min})"))
    stuck = max((v.get("oldest_txn_age_s", 0.0) for v in views.values()), default=0.0)
    if stuck > th.txn_stuck_s:
        alerts.append(Alert("txn_stuck", "warning", subject,
                            f"a transaction has been open for {stuck:.0f} s (threshold {th.txn_stuck_s:.0f} s)"))
    for n, v in views.items():
        if v.get("ticking") is False:
            alerts.append(Alert("not_ticking", "critical", subject, f"replica {n}'s Raft thread is dead"))
    status = "ok"
    mine = [a for a in alerts if a.subject == subject]
    if any(a.severity == "critical" for a in mine):
        status = "unavailable"
    elif mine:
        status = "degraded"
    return {"shard": s, "leader": leader, "term": term, "commit_idx": commit, "replicas": replicas,
            "up": up, "down": [n for n in replicas if n not in up], "lag": lag,
            "keys": views[leader]["keys"] if leader else None, "status": status}


def render_table(report: dict[str, Any]) -> str:
    """A human table of ``cluster_report`` output."""
    lines = [f"{'shard':>5}  {'leader':<8} {'term':>5} {'commit':>8}  {'keys':>8}  {'status':<11} replicas up (lag)",
             "-" * 78]
    for sh in report["shards"]:
        up = ",".join(f"{n}({sh['lag'].get(n, 0)})" for n in sh["up"]) or "-"
        down = f"  down: {','.join(sh['down'])}" if sh["down"] else ""
        lines.append(f"{sh['shard']:>5}  {sh['leader'] or '-':<8} {_n(sh['term']):>5} {_n(sh['commit_idx']):>8}  "
                     f"{_n(sh['keys']):>8}  {sh['status']:<11} {up}{down}")
    lines.append("")
    lines.append("nodes: " + ", ".join(f"{n} {s}" for n, s in report["nodes"].items()))
    if report["warnings"]:
        lines.append("")
        lines.extend(report["warnings"])
    lines.append(f"cluster: {report['verdict'].upper()}")
    return "\n".join(lines)


def _n(v: Any) -> str:
    return "-" if v is None else str(v)
