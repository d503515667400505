"""What a node does per put, by shard count: Raft entries, driver loops, group ticks, frames and engine commits.

    .venv/bin/python bench/work_per_put.py [--shards 1,3,6] [--clients 32] [--seconds 5]

For each shard count, a fresh 3-node cluster; closed-loop clients put for ``--seconds``, and every node's
``RAFTKV.STATUS`` counters are read before and after: the driver's loops and group ticks, the Raft frames and
records (one record per peer connection and loop, holding that loop's frames) each node sent, its engine's
durable commits, and each shard's commit index (Raft entries, counted once per shard). Printed per put,
summed over the three nodes, with the node processes' CPU per put. Nothing in the nodes is patched: these are
the counters the nodes export.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raftkv.bench.load import LoadParams, run_load  # noqa: E402
from raftkv.bench.systems import RaftKVSystem  # noqa: E402

COUNTERS = ("loops", "ticks", "frames_out", "records_out")


def snapshot(system: RaftKVSystem) -> dict:
    """Every node's counters now, and each shard's highest commit index."""
    nodes, entries = {}, {}
    for name in system.lc.map.nodes:
        st = json.loads(system.lc.call(name, "RAFTKV.STATUS", timeout=5.0))  # type: ignore[arg-type]
        nodes[name] = {**{k: st["raft"][k] for k in COUNTERS}, "commits": st["engine"]["commits"]}
        for shard, sh in st["shards"].items():
            entries[shard] = max(entries.get(shard, 0), sh["commit_idx"] or 0)
    return {"nodes": nodes, "entries": entries}


def measure(shards: int, clients: int, seconds: float) -> dict:
    """Per-put work of one fresh cluster of ``shards`` shards under ``clients`` closed-loop putters."""
    d = tempfile.mkdtemp(prefix="raftkv-work-")
    system = RaftKVSystem(d, shards=shards)
    try:
        run_load(system, LoadParams("put", clients, 1.0, warmup=0.5))  # connections made, leaders settled
        before = snapshot(system)
        r = run_load(system, LoadParams("put", clients, seconds, warmup=0.0))
        after = snapshot(system)
    finally:
        system.stop()
        shutil.rmtree(d, ignore_errors=True)
    puts = r.acked or r.ops  # every put acknowledged while the counters ran (the window and its drain)
    out = {"shards": shards, "puts_s": round(r.ops_s), "puts": puts,
           "cpu_ms_per_put": round(1000 * (r.server_cpu or 0) / r.ops_s, 3) if r.ops_s else None}
    out["entries"] = sum(after["entries"][s] - before["entries"].get(s, 0) for s in after["entries"])
    for k in (*COUNTERS, "commits"):
        out[k] = sum(after["nodes"][n][k] - before["nodes"][n][k] for n in after["nodes"])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", default="1,3,6", help="comma list of shard counts")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=5.0)
    a = ap.parse_args(argv)
    print(f"{'shards':>6} {'puts/s':>7} {'puts/entry':>10} | per put, 3 nodes: {'loops':>6} {'ticks':>6} "
          f"{'frames':>6} {'records':>7} {'commits':>7} {'CPU ms':>6}")
    for shards in (int(x) for x in a.shards.split(",")):
        m = measure(shards, a.clients, a.seconds)
        per = {k: m[k] / m["puts"] for k in ("loops", "ticks", "frames_out", "records_out", "commits")}
        print(f"{shards:>6} {m['puts_s']:>7} {m['puts'] / max(1, m['entries']):>10.2f} | {'':17} "
              f"{per['loops']:>6.2f} {per['ticks']:>6.2f} {per['frames_out']:>6.2f} {per['records_out']:>7.2f} "
              f"{per['commits']:>7.2f} {m['cpu_ms_per_put'] or 0:>6.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
