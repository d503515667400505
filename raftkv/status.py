"""Cluster health from the nodes' own reports: pure aggregation, no I/O.

``cluster_report(map, node_status)`` takes each node's ``RAFTKV.STATUS`` (or
an ``{"error": ...}`` entry for a node that did not answer) and decides, per
shard: who leads (the leader of the highest term any replica reports), the term,
the commit index, which replicas are up, and what is wrong.
"""

from __future__ import annotations

from typing import Any

from shards.shardmap import ShardMap


def cluster_report(m: ShardMap, node_status: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The cluster's state and a verdict: ``ok``, ``degraded`` or ``unavailable``."""
    shards = []
    warnings: list[str] = []
    worst = "ok"
    for s in range(m.nshards):
        replicas = [n.name for n in m.replicas(s)]
        up = [n for n in replicas if "error" not in node_status.get(n, {"error": "?"})
              and str(s) in node_status[n].get("shards", {})]
        views = {n: node_status[n]["shards"][str(s)] for n in up}
        leader, term = None, max((v["term"] for v in views.values()), default=None)
        for n, v in views.items():
            if v["role"] == "leader" and v["term"] == term:
                leader = n
        commit = max((v["commit_idx"] for v in views.values()), default=None)
        quorum = len(replicas) // 2 + 1
        problems = []
        if len(up) < quorum:
            problems.append(f"NO QUORUM: only {len(up)} of {len(replicas)} replicas up (need {quorum})")
        elif leader is None:
            problems.append("NO LEADER: replicas up but none leads (election in progress or partition)")
        elif len(up) == quorum and len(replicas) > 1:
            problems.append(f"bare majority: {len(up)} of {len(replicas)} replicas up; one more failure "
                            "makes the shard unavailable")
        lag = {}
        for n, v in views.items():
            if commit is not None:
                lag[n] = commit - v["commit_idx"]
        level = "ok"
        if problems:
            level = "unavailable" if problems[0].startswith("NO ") else "degraded"
            warnings.extend(f"shard {s}: {p}" for p in problems)
        if _rank(level) > _rank(worst):
            worst = level
        shards.append({
            "shard": s, "leader": leader, "term": term, "commit_idx": commit,
            "replicas": replicas, "up": up, "down": [n for n in replicas if n not in up],
            "lag": lag, "keys": views[leader]["keys"] if leader else None, "status": level,
        })
    nodes = {n: ("down: " + st["error"]) if "error" in st else "up" for n, st in node_status.items()}
    return {"verdict": worst, "shards": shards, "nodes": nodes, "warnings": warnings}


def _rank(level: str) -> int:
    return {"ok": 0, "degraded": 1, "unavailable": 2}[level]


def render_table(report: dict[str, Any]) -> str:
    """A human table of ``cluster_report`` output."""
    lines = [f"{'shard':>5}  {'leader':<8} {'term':>5} {'commit':>8}  {'keys':>8}  replicas up", "-" * 60]
    for sh in report["shards"]:
        up = ",".join(sh["up"]) or "-"
        down = f" (down: {','.join(sh['down'])})" if sh["down"] else ""
        lines.append(f"{sh['shard']:>5}  {sh['leader'] or '-':<8} {_n(sh['term']):>5} {_n(sh['commit_idx']):>8}  "
                     f"{_n(sh['keys']):>8}  {up}{down}")
    lines.append("")
    lines.append("nodes: " + ", ".join(f"{n} {s}" for n, s in report["nodes"].items()))
    if report["warnings"]:
        lines.append("")
        lines.extend(f"WARNING: {w}" for w in report["warnings"])
    lines.append(f"cluster: {report['verdict'].upper()}")
    return "\n".join(lines)


def _n(v: Any) -> str:
    return "-" if v is None else str(v)
