"""The scale benchmark: put/get throughput and p99 vs shard count and vs keys loaded, RSS per node per
million keys, how long a node killed at the largest size takes to answer and to catch up after restart, and how
fast a new follower (its data directory removed) catches up from the leaders' snapshots.

With ``rounds`` > 1 the shard counts are measured that many times, each round on fresh clusters (so each
round draws its own leader placement) in rotated order; each point reports the medians, and each shard
count its throughput against the first count as the median of the rounds' ratios (``x_first``).
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raftkv.bench.load import LoadParams, run_load
from raftkv.bench.memlimit import MemoryLimit
from raftkv.bench.preload import preload
from raftkv.bench.report import fmt_row, machine, merge_rounds, rotated
from raftkv.bench.suite import say
from raftkv.bench.systems import RaftKVSystem, proc_rss_mb
from raftkv.bench.workloads import key_name
from raftkv.cluster import LocalCluster


def _status(lc: LocalCluster, node: str) -> dict | None:
    try:
        return json.loads(lc.call(node, "RAFTKV.STATUS", timeout=2.0))  # type: ignore[arg-type]
    except (OSError, ValueError, TypeError):
        return None


def run_scale(shard_counts: tuple[int, ...] = (1, 3, 6), sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000),
              clients: int = 32, duration: float = 8.0, value_size: int = 100, out: Callable[[str], None] = say,
              workdir: str | None = None, memory_limit_mb: int | None = None, rounds: int = 1) -> dict:
    """Throughput/p99 vs shards and vs data size; RSS per million keys; restart catch-up time at the largest size.

    ``memory_limit_mb``: the nodes of the data-size part run in memory cgroups of that size (``memlimit``);
    ``rounds``: the shard counts are measured that many times (module doc)."""
    doc: dict[str, Any] = {"machine": machine(), "clients": clients, "duration_s": duration,
                           "value_size": value_size, "memory_limit_mb": memory_limit_mb, "by_shards": [],
                           "by_size": [], "restart": None}
    base = Path(workdir or tempfile.mkdtemp(prefix="raftkv-scale-"))
    out(f"scale: put and get at {clients} clients, {duration:g} s per point")
    rows: dict[tuple[int, str], list[dict]] = {}
    for rnd in range(rounds):
        for ns in rotated(shard_counts, rnd):
            d = base / f"shards{ns}-r{rnd}"
            s = RaftKVSystem(str(d), shards=ns)
            try:
                preload(s, 10_000, value_size)
                for w in ("put", "get"):
                    r = run_load(s, LoadParams(w, clients, duration, keyspace=10_000, value_size=value_size))
                    rows.setdefault((ns, w), []).append({"shards": ns, **r.row()})
                    out(f"   shards={ns} " + fmt_row(r.row())
                        + (f"  (round {rnd + 1} of {rounds})" if rounds > 1 else ""))
            finally:
                s.stop()
                shutil.rmtree(d, ignore_errors=True)
    doc["by_shards"] = shards_table(rows, shard_counts)
    for row in doc["by_shards"]:
        if row.get("x_first") is not None and row["shards"] != shard_counts[0]:
            out(f"   {row['workload']} with {row['shards']} shards: {row['x_first']:.2f}x of {shard_counts[0]} "
                f"shard(s)" + (f" (rounds {', '.join(f'{x:.2f}' for x in row['x_first_rounds'])})"
                               if rounds > 1 else ""))
    if sizes:
        limit = None if memory_limit_mb is None else MemoryLimit(memory_limit_mb)
        try:
            _run_sizes(doc, base, sizes, clients, duration, value_size, out, limit)
        finally:
            if limit is not None:
                limit.close()
    if workdir is None:
        shutil.rmtree(base, ignore_errors=True)
    return doc


def shards_table(rows: dict[tuple[int, str], list[dict]], shard_counts: tuple[int, ...]) -> list[dict]:
    """One row per (shard count, workload) from its rounds (``merge_rounds``), with ``x_first``: its ops/s
    against the first shard count's, the median of the rounds' ratios (each round's pair measured back to
    back), and ``x_first_rounds``, each round's ratio."""
    table = []
    for (_ns, w), rs in rows.items():
        row = merge_rounds(rs)
        base = rows.get((shard_counts[0], w)) if shard_counts else None
        if base is not None and len(base) == len(rs):
            ratios = [r["ops_s"] / b["ops_s"] for r, b in zip(rs, base, strict=True) if b["ops_s"]]
            if ratios:
                row["x_first"] = round(statistics.median(ratios), 2)
                row["x_first_rounds"] = [round(x, 2) for x in ratios]
        table.append(row)
    order = {ns: i for i, ns in enumerate(shard_counts)}
    return sorted(table, key=lambda r: (order.get(r["shards"], len(order)), r["workload"] != "put"))


def _run_sizes(doc: dict[str, Any], base: Path, sizes: tuple[int, ...], clients: int, duration: float,
               value_size: int, out: Callable[[str], None], limit: MemoryLimit | None = None) -> None:
    """Throughput/p99 vs keys loaded, RSS per million keys, and restart catch-up at the largest size."""
    d = base / "size"
    s = RaftKVSystem(str(d), shards=3)
    try:
        pids = s.node_pids()
        if limit is not None:
            for n, p in pids.items():
                limit.place(n, p)  # type: ignore[arg-type]
            out(f"   every node in a memory cgroup of {limit.limit >> 20} MB (anonymous memory and page cache)")
        rss0 = {n: proc_rss_mb(p) for n, p in pids.items() if p}
        doc["rss_empty_mb"] = rss0
        loaded = 0
        for size in sizes:
            elections = _leader_changes(s.lc)
            secs = preload(s, size, value_size, start=loaded)
            elections = _leader_changes(s.lc) - elections
            out(f"   loaded keys {loaded}..{size} in {secs:.1f} s ({(size - loaded) / secs:.0f} keys/s; "
                f"{elections} shard leader changes meanwhile)")
            loaded = size
            time.sleep(1.0)
            rss = {n: proc_rss_mb(p) for n, p in s.node_pids().items() if p}
            anon = {n: proc_rss_mb(p, "RssAnon") for n, p in s.node_pids().items() if p}
            entry: dict[str, Any] = {"keys": size, "load_s": round(secs, 1), "rss_mb": rss, "rss_anon_mb": anon,
                                     "leader_changes_during_load": elections}
            for w in ("put", "get"):
                r = run_load(s, LoadParams(w, clients, duration, keyspace=size, value_size=value_size))
                entry[w] = r.row()
                out(f"   keys={size} " + fmt_row(r.row()))
            doc["by_size"].append(entry)
            out(f"   keys={size}: RSS per node (MB) " + ", ".join(f"{n} {v:.0f}" for n, v in rss.items() if v)
                + "; of which anonymous " + ", ".join(f"{n} {v:.0f}" for n, v in anon.items() if v))
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
        serving_at, caught_at = _restart_and_catch_up(lc, victim, limit)
        rss = round(proc_rss_mb(lc.pid(victim) or 0) or 0)
        anon_after = round(proc_rss_mb(lc.pid(victim) or 0, "RssAnon") or 0)
        doc["restart"] = {"keys": loaded + extra, "written_while_down": extra, "node": victim,
                          "answers_status_s": None if serving_at is None else round(serving_at, 2),
                          "caught_up_s": None if caught_at is None else round(caught_at, 2), "rss_mb_after": rss,
                          "rss_anon_mb_after": anon_after}
        out(f"   restart of {victim} with {loaded + extra} keys ({extra} written while down): answers after "
            f"{doc['restart']['answers_status_s']} s, caught up (last_applied >= leaders' commit index) after "
            f"{doc['restart']['caught_up_s']} s, RSS {rss} MB (anonymous {anon_after} MB)")
        # A new follower: the node is removed from every shard group (as `raftkv node remove` does), its data
        # directory deleted, and added back empty (`raftkv node add`): it catches up from the leaders' snapshots
        # (their logs were compacted long ago). Only wiping and restarting it would not do: the leaders remember
        # the old copy's progress, and Raft never takes back what a follower acknowledged.
        op = _operator(lc)
        info = lc.map.nodes[victim]
        op.remove(victim, stop=True)
        shutil.rmtree(lc.map.node_data_dir(victim))
        op.add(f"{info.host}:{info.client_port}", name=victim, raft_port=info.raft_port, start=False)
        lc.map = op.map
        _, caught_at = _restart_and_catch_up(lc, victim, limit)
        logical = (loaded + extra) * (len(key_name(0)) + value_size + 8)
        rate = None if not caught_at else round(logical / caught_at / 1e6, 1)
        doc["snapshot_catch_up"] = {"keys": loaded + extra, "logical_mb": round(logical / 1e6, 1),
                                    "caught_up_s": None if caught_at is None else round(caught_at, 2),
                                    "logical_mb_per_s": rate}
        said = (f"caught up by snapshot after {doc['snapshot_catch_up']['caught_up_s']} s ({rate} MB/s of keys and "
                "values)" if caught_at else f"NOT caught up by snapshot within {CATCH_UP_TIMEOUT_S:g} s")
        out(f"   new follower {victim} (removed, data deleted, added back) with {loaded + extra} keys: {said}")
    finally:
        s.stop()


def _operator(lc: LocalCluster) -> Any:
    """The cluster's membership operator (what `raftkv node add/remove` run), starting nodes through ``lc``."""
    from raftkv.membership import Operator

    class BenchOperator(Operator):
        def _local_cluster(self) -> Any:
            return lc

    return BenchOperator(lc.config, timeout=60.0)


def _leader_changes(lc: LocalCluster) -> int:
    """Times a replica became a shard leader, over every node's log so far."""
    total = 0
    for name in lc.map.nodes:
        try:
            total += lc.log_file(name).read_text(errors="replace").count("new=leader")
        except OSError:
            pass
    return total


#: How long a restarted or new node gets to catch up before the bench gives up on it (and says so).
CATCH_UP_TIMEOUT_S = 300.0


def _restart_and_catch_up(lc: LocalCluster, victim: str,
                          limit: MemoryLimit | None = None) -> tuple[float | None, float | None]:
    """Start ``victim``; seconds until it answers status, and until it applied the others' commit indexes."""
    target: dict[str, int] = {}
    for n in lc.map.nodes:
        if n == victim:
            continue
        st = _status(lc, n) or {"shards": {}}
        for sh, v in st["shards"].items():
            target[sh] = max(target.get(sh, 0), v["commit_idx"])
    t0 = time.monotonic()
    lc.start_node(victim)
    if limit is not None:
        limit.place(victim, lc.pid(victim))  # type: ignore[arg-type]
    serving_at = caught_at = None
    while time.monotonic() - t0 < CATCH_UP_TIMEOUT_S:
        st = _status(lc, victim)
        if st is not None and serving_at is None:
            serving_at = time.monotonic() - t0
        if st is not None and all(sh in st["shards"] and st["shards"][sh]["last_applied"] >= idx
                                  for sh, idx in target.items()):
            caught_at = time.monotonic() - t0
            break
        time.sleep(0.05)
    return serving_at, caught_at
