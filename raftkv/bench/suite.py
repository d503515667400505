"""The side-by-side suite (``raftkv bench``): raftkv against etcd and Redis on the same load generator.

Theory of operation
-------------------
``run_suite`` brings up a fresh local raftkv cluster (3 nodes, ``shards`` shards, durable, linearizable),
and, when their binaries are on PATH, an etcd 3.4 cluster (3 members on loopback, driven through its v3
HTTP/JSON gateway as ``etcd`` and through its native gRPC API as ``etcd-grpc``: one cluster serves both)
and a single Redis (``appendonly yes``, ``appendfsync always``: the unreplicated ceiling).  raftkv's ratio
against etcd is taken against the faster of etcd's two APIs at each point.  All of them run at once but only one is driven at a time, and the points of one (workload,
clients) pair are measured back to back, so background load on a shared machine hits each system alike.
Each is preloaded with the key space, then driven by ``raftkv.bench.load`` for every (workload,
concurrency) point; with ``rounds`` > 1 every point is measured that many times per system, the systems'
order rotated each round, and reported as the medians (``raftkv.bench.report.merge_rounds``), raftkv's
ratios as the median of the rounds' ratios.  ``redis-benchmark``, when on PATH, is run against one raftkv node and against Redis.

Nothing here runs at import.  Nothing is installed: peers missing from PATH are reported as skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from raftkv.bench.load import LoadParams, run_load
from raftkv.bench.preload import preload
from raftkv.bench.report import add_ratios, fmt_row, machine, merge_rounds, plot, render_table, rotated
from raftkv.bench.systems import (
    ALL_PEERS,
    EtcdGrpcSystem,
    EtcdSystem,
    RaftKVSystem,
    RedisSystem,
    System,
    found_peers,
)
from raftkv.bench.workloads import COMMAND_NEEDED, NOT_APPLICABLE, WORKLOADS, applicable


def run_redis_benchmark(addr: tuple[str, int], clients: int, requests: int, value_size: int,
                        keyspace: int) -> dict[str, dict]:
    """``redis-benchmark -t set,get`` (CSV); {test: {rps, avg_ms, p50_ms, p99_ms}}."""
    cmd = ["redis-benchmark", "-h", addr[0], "-p", str(addr[1]), "-t", "set,get", "-n", str(requests),
           "-c", str(clients), "-d", str(value_size), "-r", str(keyspace), "--csv"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    res: dict[str, dict] = {}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith('"')]
    if not lines:
        raise RuntimeError(f"redis-benchmark gave no CSV output: {out.stderr.strip()[:200]}")
    header = [h.strip('"') for h in lines[0].split(",")]
    for ln in lines[1:]:
        row = dict(zip(header, [c.strip('"') for c in ln.split(",")], strict=False))
        res[row["test"]] = {"rps": float(row["rps"]), "avg_ms": float(row.get("avg_latency_ms", "nan")),
                            "p50_ms": float(row.get("p50_latency_ms", "nan")),
                            "p99_ms": float(row.get("p99_latency_ms", "nan"))}
    res["command"] = {"argv": " ".join(cmd)}  # type: ignore[assignment]
    return res


@dataclass
class SuiteConfig:
    workloads: list[str] = field(default_factory=lambda: ["put"])
    clients: list[int] = field(default_factory=lambda: [1, 32])
    duration: float = 10.0
    warmup: float = 1.0
    shards: int = 3
    peers: list[str] = field(default_factory=lambda: list(ALL_PEERS))
    keyspace: int = 10_000
    value_size: int = 100
    dist: str = "uniform"
    procs: int = 0
    via: str = "raw"
    redis_benchmark: bool = True
    redis_benchmark_requests: int = 20_000
    json_path: str | None = None
    png_path: str | None = None
    workdir: str | None = None
    rounds: int = 1  # each point measured this many times per system, the systems' order rotated each round


def say(msg: str) -> None:
    """Progress output: one flushed line (runs take minutes)."""
    print(msg, flush=True)


def run_suite(cfg: SuiteConfig, out: Callable[[str], None] = say) -> dict:
    """The side-by-side run; returns (and writes, if asked) the JSON document."""
    for w in cfg.workloads:
        if w not in WORKLOADS:
            raise ValueError(f"unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")
    workloads = list(cfg.workloads)
    peers, skipped = found_peers(cfg.peers)
    if cfg.via == "client" and peers:
        skipped.update({p: "--via client drives raftkv only" for p in peers})
        peers = []
    mach = machine()
    doc: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv), "machine": mach,
        "config": asdict(cfg), "peers_found": peers, "peers_skipped": skipped,
        "not_available": {}, "not_applicable": {},
        "systems": {}, "results": [], "redis_benchmark": {},
    }
    doc["loadavg_at_start"] = [round(x, 1) for x in os.getloadavg()]
    out(f"load average at start: {doc['loadavg_at_start']} (other processes on this machine share the CPUs)")
    out(f"machine: {mach['nproc']} CPUs ({mach['cpu']}), Python {mach['python']}, kernel {mach['kernel']}")
    out(f"peers found: {', '.join(peers) or 'none'}; skipped: "
        + (", ".join(f"{p} ({why})" for p, why in skipped.items()) or "none"))
    procs_desc = (f"{cfg.procs or 'min(clients, nproc)'} worker process(es), each one selectors event loop over raw "
                  "sockets, one connection per client per node, closed loop (1 request in flight per client)")
    if cfg.via == "client":
        procs_desc = f"{cfg.procs or 'min(clients, nproc)'} worker process(es), each with threads using raftkv.Client"
    out(f"load generator: {procs_desc}; warmup {cfg.warmup:g} s then {cfg.duration:g} s measured per point; "
        f"keys {cfg.dist} over {cfg.keyspace} (preloaded), values {cfg.value_size} B")
    doc["generator"] = procs_desc
    base = Path(cfg.workdir or tempfile.mkdtemp(prefix="raftkv-bench-"))
    running: dict[str, System] = {}
    try:
        for sname in ["raftkv", *peers]:
            d = base / sname
            d.mkdir(parents=True, exist_ok=True)
            out(f"== {sname}: starting")
            t0 = time.monotonic()
            etcd = _etcd_cluster(running)
            if sname == "raftkv":
                running[sname] = RaftKVSystem(str(d), shards=cfg.shards)
            elif sname in ("etcd", "etcd-grpc"):
                cluster = etcd or EtcdSystem(str(d))
                running[sname] = cluster if sname == "etcd" else EtcdGrpcSystem(cluster)
            else:
                running[sname] = RedisSystem(str(d))
            sys_ = running[sname]
            out(f"   {sys_.description()} (up in {time.monotonic() - t0:.1f} s)")
            doc["systems"][sname] = sys_.description()
            if isinstance(sys_, RaftKVSystem):
                workloads = _offered(sys_, workloads, doc["not_available"], out)
            if sname.startswith("etcd") and etcd is not None:
                out("   the same etcd members and keys as above")
                continue
            secs = preload(sys_, cfg.keyspace, cfg.value_size)
            out(f"   preloaded {cfg.keyspace} keys in {secs:.1f} s")
        for w in workloads:
            for n in cfg.clients:
                names = []
                for sname in running:
                    if applicable(w, sname):
                        names.append(sname)
                    else:
                        doc["not_applicable"].setdefault(w, {})[sname] = NOT_APPLICABLE[w][sname]
                if not names:
                    continue
                rows: dict[str, list[dict]] = {sname: [] for sname in names}
                for rnd in range(cfg.rounds):
                    # Rotate who goes first: a system measured right after another may find the CPUs warmer
                    # or the disk busier.
                    for sname in rotated(names, rnd):
                        p = LoadParams(w, n, cfg.duration, cfg.warmup, cfg.keyspace, cfg.value_size, cfg.dist,
                                       cfg.procs, via=cfg.via)
                        row = run_load(running[sname], p).row()
                        row["loadavg_1m"] = round(os.getloadavg()[0], 1)
                        rows[sname].append(row)
                        out("   " + fmt_row(row) + (f"  (round {rnd + 1} of {cfg.rounds})" if cfg.rounds > 1 else ""))
                doc["results"].extend(merge_rounds(rows[sname]) for sname in names)
        if cfg.redis_benchmark and shutil.which("redis-benchmark"):
            for n in cfg.clients:
                for sname, sys_ in running.items():
                    if sname not in ("raftkv", "redis"):
                        continue
                    addr = (next(iter(sys_.lc.map.nodes.values())).client_addr if isinstance(sys_, RaftKVSystem)
                            else tuple(sys_.spec()["addr"]))
                    try:
                        rb = run_redis_benchmark(addr, n, max(cfg.redis_benchmark_requests // (1 if n > 1 else 4),
                                                              1000), cfg.value_size, cfg.keyspace)
                    except (RuntimeError, subprocess.TimeoutExpired) as e:
                        out(f"   redis-benchmark {sname} -c {n}: failed: {e}")
                        continue
                    doc["redis_benchmark"].setdefault(sname, {})[str(n)] = rb
                    out(f"   redis-benchmark {sname} -c {n}: " + ", ".join(
                        f"{t} {v['rps']:.0f}/s p50 {v['p50_ms']} ms p99 {v['p99_ms']} ms"
                        for t, v in rb.items() if t != "command"))
        elif cfg.redis_benchmark:
            out("redis-benchmark not on PATH (Debian: apt-get install redis-tools): skipped")
    finally:
        for sys_ in running.values():
            sys_.stop()
    add_ratios(doc)
    out("")
    out(render_table(doc))
    if cfg.json_path:
        Path(cfg.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.json_path).write_text(json.dumps(doc, indent=1))
        out(f"wrote {cfg.json_path}")
    if cfg.png_path:
        try:
            plot(doc, cfg.png_path)
            out(f"wrote {cfg.png_path}")
        except ImportError:
            out("matplotlib not installed (pip install -e '.[plot]'): no chart")
    if cfg.workdir is None:
        shutil.rmtree(base, ignore_errors=True)
    return doc


def _etcd_cluster(running: dict[str, System]) -> EtcdSystem | None:
    """The etcd cluster already started for the other etcd API, if any."""
    for s in running.values():
        if isinstance(s, EtcdSystem):
            return s
        if isinstance(s, EtcdGrpcSystem):
            return s.etcd
    return None


def _offered(raftkv: RaftKVSystem, workloads: list[str], not_available: dict, out: Callable[[str], None]) -> list[str]:
    """The workloads whose commands the running raftkv knows; the others go into ``not_available``."""
    unknown = raftkv.unknown_commands({COMMAND_NEEDED[w] for w in workloads if w in COMMAND_NEEDED})
    for w in workloads:
        if COMMAND_NEEDED.get(w) in unknown:
            not_available[w] = f"not available in this build (unknown command {COMMAND_NEEDED[w]})"
            out(f"   workload {w}: {not_available[w]}")
    return [w for w in workloads if w not in not_available]
