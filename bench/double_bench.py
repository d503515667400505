"""Double the nodes, 3 -> 6, online: replicas and leaders per node, rebalance time, throughput before and after.

Usage: ``python bench/double_bench.py [--keys N] [--value-size B] [--clients C] [--duration S]
[--json FILE] [--netns auto|require|off] [--dir DIR]``

1. *Namespace.*  As the fault harness does (``jepsen_like.netns``), the script re-executes itself in a private
   network namespace (``unshare -n``; only its own loopback, ``127.0.0.0/8``, is configured: the host's
   network is never touched) and node *i* listens on ``127.0.0.i``, its outgoing connections bound to that
   address by the harness's bind shim.  ``--netns auto`` falls back to every node on ``127.0.0.1`` (and says
   so) where no namespace can be made; ``require`` stops there; ``off`` never tries.
2. *Before.*  3 nodes x 6 shards, replication 3, N keys of B bytes preloaded (``Client.put_many``);
   ``raftkv leaders balance``; replicas and leaders per node (expected: 6 replicas and 2 leaders on each);
   put then get throughput at C clients for S seconds (``raftkv.bench.load``, keys drawn from the preloaded
   ones, values the same bytes, so every key still reads back the preloaded value afterwards).
3. *Double.*  ``raftkv node add 127.0.0.i:PORT --empty`` for i = 4, 5, 6, then ``raftkv rebalance``: its wall
   time, steps and leadership moves.
4. *After.*  Replicas and leaders per node (expected: 3 and 1 on each, within one), every shard's replicas
   agreeing (equal ``RAFTKV.HASHKV`` digests at equal revisions, and equal key counts adding up to N),
   every preloaded key read back (``MGET``), then put and get throughput again.

What this measures, and what it cannot: every node, the load generator and the rebalance share the one
machine's cores (2 here), so throughput cannot rise with nodes; the before/after figures compare 3 and 6
node processes on the same cores (the same Raft traffic, three replicas per shard, spread over twice the
processes).  The placement and leader spread, the rebalance's wall time, and that no key is lost are what
this shows.  A JSON summary goes to ``--json FILE``; the exit status is 0 only if the spread ends even and
every check passed.  Measured figures: docs/scale-out.md, "Doubling the nodes".
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from jepsen_like import netns
from jepsen_like import replicas as replicas_check
from raftkv.bench.load import LoadParams, run_load
from raftkv.bench.preload import preload
from raftkv.bench.scaleout import even, keys_per_shard, leaders_per_node, per_node, read_back, run_cli
from raftkv.bench.systems import RaftKVSystem
from raftkv.bench.workloads import make_value
from raftkv.cluster import LocalCluster, free_base_port

NODES_BEFORE, NODES_AFTER, SHARDS = 3, 6, 6
NS_BASE_PORT = 7001  # the namespace's ports are all ours, as in the harness

HONESTY = ("all {after} nodes, the load generator and the rebalance share this one machine's {cpus} CPU(s): "
           "throughput cannot rise with nodes here; before/after compare {before} and {after} node processes on "
           "the same cores. Measured: replica and leader spread, the rebalance's wall time, data agreement and "
           "read-back, and throughput on the same cores before and after. Not measured: nodes on separate "
           "machines, a real network.")


def _say(msg: str) -> None:
    print(msg, flush=True)


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return ""


def _throughput(system: RaftKVSystem, a: argparse.Namespace, label: str) -> dict[str, Any]:
    """Put then get at ``a.clients`` clients, ``a.duration`` s each, over the preloaded keys."""
    out: dict[str, Any] = {}
    for workload in ("put", "get"):
        r = run_load(system, LoadParams(workload, a.clients, a.duration, warmup=1.0, keyspace=a.keys,
                                        value_size=a.value_size, op_timeout=10.0))
        out[workload] = {"ops_s": r.ops_s, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "errors": r.errors,
                         "error_codes": r.error_codes, "server_cpu": r.server_cpu}
        _say(f"{label}: {workload} at {a.clients} clients: {r.ops_s:,.0f} ops/s (p50 {r.p50_ms} ms, p99 "
             f"{r.p99_ms} ms, {r.errors} errors; server CPU {r.server_cpu} s/s) load average {_loadavg()}")
    return out


def _node_links(hosts: list[str]) -> dict[str, int]:
    """Established TCP connections in this network namespace (``/proc/net/tcp`` is per namespace) between two
    different node addresses, per pair, both ends counted: non-empty only if nodes connect from their own
    ``127.0.0.i`` (the bind shim), not from the harness's :data:`jepsen_like.netns.HARNESS_ADDR`."""
    def ip(field: str) -> str:
        return ".".join(str(b) for b in reversed(bytes.fromhex(field.split(":")[0])))

    out: dict[str, int] = {}
    try:
        with open("/proc/net/tcp") as f:
            rows = f.read().splitlines()[1:]
    except OSError:
        return out
    for row in rows:
        cols = row.split()
        a, b = ip(cols[1]), ip(cols[2])
        if cols[3] == "01" and a != b and a in hosts and b in hosts:  # 01: ESTABLISHED
            pair = "<->".join(sorted((a, b)))
            out[pair] = out.get(pair, 0) + 1
    return dict(sorted(out.items()))


def _spread(lc: LocalCluster, label: str) -> dict[str, Any]:
    """Replicas per node (in the map, and the groups each node reports hosting) and leaders per node."""
    nodes = list(lc.map.nodes)
    placement = {s: list(lc.map.placement[s]) for s in range(lc.map.nshards)}
    hosted: dict[int, list[str]] = {}
    for name, st in lc.shard_views().items():
        for s in st["shards"]:
            hosted.setdefault(int(s), []).append(name)
    leaders = lc.leaders()
    out = {"replicas_per_node": per_node(placement, nodes), "hosted_per_node": per_node(hosted, nodes),
           "leaders_per_node": leaders_per_node(leaders, nodes),
           "leaderless_shards": sorted(s for s, n in leaders.items() if n is None), "placement": placement}
    out["replicas_even"] = even(out["replicas_per_node"])
    out["leaders_even"] = even(out["leaders_per_node"]) and not out["leaderless_shards"]
    _say(f"{label}: replicas per node {_fmt(out['replicas_per_node'])} (nodes report hosting "
         f"{_fmt(out['hosted_per_node'])}); leaders per node {_fmt(out['leaders_per_node'])}"
         + (f"; no leader: shards {out['leaderless_shards']}" if out["leaderless_shards"] else ""))
    return out


def _fmt(counts: dict[str, int]) -> str:
    return ", ".join(f"{n}={c}" for n, c in counts.items())


def _agreement(lc: LocalCluster, n: int, timeout: float = 60.0) -> dict[str, Any]:
    """HASHKV digests equal at equal revisions, and key counts equal per shard adding up to ``n``."""
    placement = {s: list(lc.map.placement[s]) for s in range(lc.map.nshards)}
    hashkv = replicas_check.check(replicas_check.ask_node(lc), placement, timeout=timeout)
    deadline = time.monotonic() + timeout
    while True:  # a follower may still be applying the last writes of the load: ask again until settled
        counts = keys_per_shard(lc)
        agree = all(len(v) == 1 for v in counts.values()) and len(counts) == lc.map.nshards
        if agree or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    total = sum(v[0] for v in counts.values()) if agree else None
    _say(f"replicas agree: HASHKV {hashkv['verdict']} ({hashkv['summary']}); keys per shard "
         f"{json.dumps(counts)}, total {total}")
    return {"hashkv": hashkv, "keys_per_shard": counts, "key_counts_agree": agree, "total_keys": total,
            "total_is_preloaded": total == n}


def run(a: argparse.Namespace, tmp: str, in_ns: bool, note: str) -> dict[str, Any]:
    if in_ns:
        netns.setup_inside()  # loopback up; the harness's (our) own connections from 127.0.0.250
        shim = netns.write_bind_shim(Path(tmp) / "shim")
        # Every node process, those `raftkv node add` starts included, inherits this environment.
        os.environ["PYTHONPATH"] = str(shim) + os.pathsep + os.environ.get("PYTHONPATH", "")
        os.environ[netns.BIND_ENV] = ",".join(f"n{i}=127.0.0.{i}" for i in range(1, NODES_AFTER + 1))
        base = NS_BASE_PORT
    else:
        base = free_base_port(NODES_AFTER, SHARDS)

    def host(i: int) -> str:
        return f"127.0.0.{i}" if in_ns else "127.0.0.1"

    cpus = os.cpu_count() or 0
    honesty = HONESTY.format(before=NODES_BEFORE, after=NODES_AFTER, cpus=cpus)
    mode = "private network namespace, node i on 127.0.0.i" if in_ns else f"host loopback, every node on 127.0.0.1 ({note})"
    summary: dict[str, Any] = {
        "command": "python bench/double_bench.py " + " ".join(sys.argv[1:]),
        "keys": a.keys, "value_size": a.value_size, "clients": a.clients, "duration_s": a.duration,
        "shards": SHARDS, "replication": 3, "nodes_before": NODES_BEFORE, "nodes_after": NODES_AFTER,
        "network": mode, "cpus": cpus, "honesty": honesty, "uptime_start": _uptime(),
        "loadavg": {"start": _loadavg()},
    }
    _say(f"double_bench: {NODES_BEFORE} -> {NODES_AFTER} nodes, {SHARDS} shards, replication 3, {a.keys:,} keys of "
         f"{a.value_size} B; {mode}")
    _say(f"note: {honesty}")
    _say(f"machine: {summary['uptime_start']}")
    system = RaftKVSystem(a.dir or tmp, shards=SHARDS, nodes=NODES_BEFORE, base_port=base, per_node_hosts=in_ns)
    lc = system.lc
    cfg = str(lc.config)
    try:
        loaded = preload(system, a.keys, a.value_size)
        summary["preload_s"] = round(loaded, 2)
        _say(f"preloaded {a.keys:,} keys of {a.value_size} B in {loaded:.1f} s")
        summary["leaders_as_elected"] = leaders_per_node(lc.leaders(), lc.map.nodes)
        _, out = run_cli("leaders", "balance", "--cluster", cfg)
        _say("raftkv leaders balance: " + "; ".join(out.strip().splitlines()))
        summary["before"] = _spread(lc, "before")
        summary["throughput_before"] = _throughput(system, a, "before")
        summary["loadavg"]["before_rebalance"] = _loadavg()

        adds = []
        for i in range(NODES_BEFORE + 1, NODES_AFTER + 1):
            took, out = run_cli("node", "add", f"{host(i)}:{base + i - 1}", "--empty", "--cluster", cfg)
            adds.append(round(took, 2))
            _say(f"raftkv node add {host(i)}:{base + i - 1} --empty ({took:.1f} s): {out.strip().splitlines()[-1]}")
        took, out = run_cli("rebalance", "--cluster", cfg)
        _say(out.strip())
        done = re.search(r"done: (\d+) step\(s\) in ([\d.]+) s, (\d+) leadership move", out)
        steps = re.findall(r"^step \d+/\d+: .* in ([\d.]+) s$", out, re.M)
        summary["node_add_s"] = adds
        summary["rebalance"] = {
            "wall_s": round(took, 2), "steps": int(done.group(1)) if done else None,
            "reported_s": float(done.group(2)) if done else None,
            "leader_moves": int(done.group(3)) if done else None,
            "adds": out.count(": add "), "removes": out.count(": remove "),
            "step_s": [float(x) for x in steps], "output": out.strip().splitlines(),
        }
        _say(f"raftkv rebalance: {took:.1f} s wall ({a.keys:,} keys, {NODES_BEFORE} -> {NODES_AFTER} nodes, "
             f"{SHARDS} shards)")
        summary["loadavg"]["after_rebalance"] = _loadavg()

        lc = system.lc = LocalCluster(lc.dir)  # the map as the rebalance left it, the added nodes' pids
        lc.wait_ready(60)
        if in_ns:
            links = summary["node_to_node_tcp"] = _node_links([host(i) for i in range(1, NODES_AFTER + 1)])
            _say(f"established TCP connections between node addresses ({len(links)} pairs): {_fmt(links)}")
        summary["after"] = _spread(lc, "after")
        summary["agreement"] = _agreement(lc, a.keys)
        t0 = time.monotonic()
        back = read_back([i.client_addr for i in lc.map.nodes.values()], a.keys, make_value(a.value_size))
        summary["read_back"] = {**back, "all_ok": back["ok"] == a.keys, "seconds": round(time.monotonic() - t0, 2)}
        _say(f"read back {a.keys:,} preloaded keys in {summary['read_back']['seconds']} s: {back}")
        summary["throughput_after"] = _throughput(system, a, "after")
        summary["loadavg"]["end"] = _loadavg()
        summary["uptime_end"] = _uptime()
        summary["ok"] = bool(summary["after"]["replicas_even"] and summary["after"]["leaders_even"]
                             and summary["agreement"]["hashkv"]["valid"] and summary["agreement"]["total_is_preloaded"]
                             and summary["read_back"]["all_ok"])
        _say(f"machine: {summary['uptime_end']}")
        _say(f"result: {'OK' if summary['ok'] else 'NOT OK'}: after the doubling replicas per node "
             f"{_fmt(summary['after']['replicas_per_node'])}, leaders per node "
             f"{_fmt(summary['after']['leaders_per_node'])}; rebalance {took:.1f} s; throughput on the same "
             f"{cpus} CPU(s): put {summary['throughput_before']['put']['ops_s']:,.0f} -> "
             f"{summary['throughput_after']['put']['ops_s']:,.0f} ops/s, get "
             f"{summary['throughput_before']['get']['ops_s']:,.0f} -> "
             f"{summary['throughput_after']['get']['ops_s']:,.0f} ops/s")
    finally:
        LocalCluster(lc.dir).stop()
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--value-size", type=int, default=100)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds per throughput point")
    ap.add_argument("--json", default=None, metavar="FILE", help="write the summary here")
    ap.add_argument("--netns", choices=("auto", "require", "off"), default="auto")
    ap.add_argument("--dir", default=None, help="cluster directory (default: a temporary one)")
    a = ap.parse_args()
    note = "--netns off"
    if a.netns != "off" and not netns.inside():
        avail = netns.probe()
        if avail.ok:
            cmd, env = netns.reexec_python(avail, [str(Path(__file__).resolve()), *sys.argv[1:]])
            raise SystemExit(subprocess.run(cmd, env=env, check=False).returncode)
        if a.netns == "require":
            raise SystemExit(f"double_bench: no private network namespace: {avail.reason}")
        note = f"no private network namespace: {avail.reason}"
        _say(f"double_bench: note: {note}; every node on 127.0.0.1")
    with tempfile.TemporaryDirectory(prefix="double-bench-") as tmp:
        summary = run(a, tmp, netns.inside(), note)
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        _say(f"wrote {a.json}")
    raise SystemExit(0 if summary.get("ok") else 1)


if __name__ == "__main__":
    main()
