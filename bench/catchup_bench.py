"""How fast a new follower catches up by snapshot: MB/s of keys and values, and where the time went.

Usage::

    python bench/catchup_bench.py [--keys N] [--shards S] [--value-size B] [--rounds R]
                                  [--tree NAME=DIR ...] [--workdir DIR] [--json FILE]

Preloads N keys of B bytes (``Client.put_many``) into a 3-node cluster of S shards once, stops it and keeps a
copy of its directory.  Each trial restores that copy, starts the cluster, removes the last node from every
group (``raftkv node remove``), deletes its data directory, adds it back empty (``raftkv node add``) and
times from its start until it applied the others' commit indexes, as ``raftkv bench scale`` does (so the
figure includes the process start and the elections).  The rate is (keys x (key + value + 8 B)) / seconds,
the same "MB/s of keys and values" as the scale bench.  From the new node's log it also reports when its
first snapshot chunk arrived and each shard's install time (``event=snapshot_receiving`` /
``event=snapshot_installed``).

``--tree NAME=DIR`` (repeatable) runs the trials with the raftkv code of DIR (e.g. an export of another
commit): the trees alternate within each round, so a comparison sees the same machine load.  Without it the
code of this checkout is measured.  Every node runs on this one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]


def preload_cluster(base: Path, keys: int, shards: int, value_size: int) -> float:
    """A stopped 3-node cluster in ``base`` holding ``keys`` keys; returns the load's seconds."""
    from raftkv.bench.preload import preload
    from raftkv.bench.systems import RaftKVSystem

    system = RaftKVSystem(str(base), shards=shards, nodes=3)
    try:
        took = preload(system, keys, value_size)
        # Let every leader checkpoint and compact what the load wrote, so a new follower needs a snapshot.
        time.sleep(3.0)
    finally:
        system.stop()
    return took


def trial(run: Path, keys: int, value_size: int) -> dict[str, Any]:
    """One catch-up of a new follower in the cluster in ``run`` (runs with whatever raftkv is importable)."""
    from raftkv.bench.scale import _operator, _restart_and_catch_up
    from raftkv.bench.workloads import key_name
    from raftkv.cluster import LocalCluster

    lc = LocalCluster(run)
    lc.start()
    try:
        lc.wait_ready(120)
        victim = sorted(lc.map.nodes)[-1]
        op = _operator(lc)
        info = lc.map.nodes[victim]
        op.remove(victim, stop=True)
        shutil.rmtree(lc.map.node_data_dir(victim))
        log_file = lc.log_file(victim)
        log_file.unlink(missing_ok=True)
        op.add(f"{info.host}:{info.client_port}", name=victim, raft_port=info.raft_port, start=False)
        lc.map = op.map
        t0 = time.time()
        others = {n: lc.pid(n) for n in lc.map.nodes if n != victim}
        cpu0 = {n: _cpu_s(pid) for n, pid in others.items()}
        serving, caught = _restart_and_catch_up(lc, victim)
        # CPU seconds each node spent from the new node's start until it caught up (the new node's include its
        # start-up): what the catch-up costs, whatever share of the machine the processes got
        cpu = {n: round(_cpu_s(pid) - cpu0[n], 2) for n, pid in others.items()}
        cpu[victim] = round(_cpu_s(lc.pid(victim)), 2)
        time.sleep(0.5)  # the log lines of the last install
        logical = keys * (len(key_name(0)) + value_size + 8)
        out: dict[str, Any] = {"raftkv": str(Path(__import__("raftkv").__file__).parent), "cpu_s": cpu,
                               "caught_up_s": caught, "answers_s": serving, "logical_mb": logical / 1e6,
                               "mb_per_s": None if not caught else logical / caught / 1e6}
        out.update(_log_breakdown(log_file.read_text(errors="replace"), t0))
        return out
    finally:
        lc.stop()


def local_trial(engine_dir: Path, shard: int) -> dict[str, Any]:
    """Stream ``shard`` of a copy of the engine in ``engine_dir`` to a new follower engine, in this process,
    calling the leader's and the follower's serializer in turn (no network, no Raft): the CPU seconds each
    side spent, and the wall time."""
    from raftkv.engine import Engine
    from raftkv.snapshot import ShardSnapshots

    tmp = Path(tempfile.mkdtemp(prefix="catchup-local-"))
    try:
        shutil.copytree(engine_dir, tmp / "leader")
        engines = [Engine(str(tmp / "leader")), Engine(str(tmp / "follower"))]
        held: list[dict] = [{}, {}]
        sides = []
        for i, engine in enumerate(engines):
            snaps = ShardSnapshots(engine, shard, str(tmp / f"{i}.snapshot"), 1 << 20,
                                   lambda h=held[i]: h["s"], lambda st, h=held[i]: h.__setitem__("s", st))
            held[i]["s"] = snaps.open_state()
            sides.append(snaps)
        leader, follower = sides
        cpu_leader = cpu_follower = 0.0
        wall = time.perf_counter()
        while True:
            a = time.thread_time()
            chunk = leader.getTransmissionData("f")
            b = time.thread_time()
            follower.setTransmissionData(chunk)
            if chunk[2]:
                follower.deserialize()
            c = time.thread_time()
            cpu_leader, cpu_follower = cpu_leader + b - a, cpu_follower + c - b
            if chunk[2]:
                break
        wall = time.perf_counter() - wall
        keys = len(held[1]["s"])
        for engine in engines:
            engine.close()
        return {"keys": keys, "leader_cpu_s": cpu_leader, "follower_cpu_s": cpu_follower, "wall_s": wall}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of process ``pid`` so far (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError, TypeError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


_TS = re.compile(r"^ts=(\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d[,.]\d+)")


def _log_breakdown(text: str, t0: float) -> dict[str, Any]:
    """First chunk arrival (s after start) and per-shard install ms from the new node's log."""
    import datetime as dt

    def when(line: str) -> float | None:
        m = _TS.match(line)
        if not m:
            return None
        s = m.group(1).replace(",", ".").replace("T", " ")
        return dt.datetime.strptime(s, "%Y-%m-%d %H:%M:%S.%f").timestamp()

    first = last = None
    installs = []
    for line in text.splitlines():
        if "event=snapshot_receiving" in line and first is None:
            first = when(line)
        if "event=snapshot_installed" in line:
            last = when(line)
            m = re.search(r"ms=([\d.]+)", line)
            if m:
                installs.append(float(m.group(1)))
    return {"transfers_begun": text.count("event=snapshot_receiving"),  # more than the shards: some restarted
            "silence_drops": text.count("why='nothing read"),
            "first_chunk_s": None if first is None else round(first - t0, 2),
            "last_install_s": None if last is None else round(last - t0, 2),
            "install_ms": installs}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument("--value-size", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tree", action="append", default=[], help="NAME=DIR: measure the raftkv code of DIR")
    ap.add_argument("--workdir", default=None, help="keep the preloaded cluster here (reused if present)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--local", action="store_true",
                    help="no cluster: stream shard 0 of the preloaded first node's engine to a new engine in one "
                         "process, and report each side's CPU time (less sensitive to the machine's load)")
    ap.add_argument("--trial", default=None, help=argparse.SUPPRESS)  # internal: one trial in this directory
    ap.add_argument("--local-trial", default=None, help=argparse.SUPPRESS)  # internal: one local trial
    a = ap.parse_args()
    if a.trial:
        print(json.dumps(trial(Path(a.trial), a.keys, a.value_size)))
        return 0
    if a.local_trial:
        print(json.dumps(local_trial(Path(a.local_trial), 0)))
        return 0
    trees = dict(t.split("=", 1) for t in a.tree) or {"this": str(REPO)}
    work = Path(a.workdir or tempfile.mkdtemp(prefix="catchup-"))
    pristine, run = work / "pristine", work / "run"
    if not (pristine / "cluster.toml").exists():
        took = preload_cluster(pristine, a.keys, a.shards, a.value_size)
        print(f"preloaded {a.keys} keys of {a.value_size} B on {a.shards} shards in {took:.1f} s", flush=True)
    results: dict[str, list[dict]] = {name: [] for name in trees}
    if a.local:
        return _local(a, trees, pristine / "data" / "n1" / "engine")
    for r in range(a.rounds):
        for name, tree in trees.items():
            shutil.rmtree(run, ignore_errors=True)
            shutil.copytree(pristine, run, symlinks=True)
            _retarget(pristine, run)
            env = dict(os.environ, PYTHONPATH=str(Path(tree).resolve()))
            # cwd: not a checkout, or the nodes (python -m raftkv) would import its raftkv instead of the tree's
            p = subprocess.run([sys.executable, str(HERE), "--trial", str(run), "--keys", str(a.keys),
                                "--value-size", str(a.value_size)], env=env, capture_output=True, text=True,
                               cwd=work)
            if p.returncode != 0:
                print(p.stdout, p.stderr, file=sys.stderr)
                return 1
            res = json.loads(p.stdout.strip().splitlines()[-1])
            res["loadavg_1m"] = os.getloadavg()[0]
            results[name].append(res)
            took = (f"caught up in {res['caught_up_s']:.2f} s = {res['mb_per_s']:.1f} MB/s" if res["caught_up_s"]
                    else "NOT caught up in the time the bench allows (raftkv.bench.scale.CATCH_UP_TIMEOUT_S)")
            print(f"round {r + 1} {name} ({res['raftkv']}): {took} "
                  f"(first chunk at {res['first_chunk_s']} s, last install at {res['last_install_s']} s, "
                  f"installs ms {res['install_ms']}, transfers begun {res['transfers_begun']}, "
                  f"connections dropped for silence {res['silence_drops']}, CPU s {res['cpu_s']}, "
                  f"load {res['loadavg_1m']:.1f})", flush=True)
    summary = {"keys": a.keys, "shards": a.shards, "value_size": a.value_size, "results": results, "median": {}}
    for name, rs in results.items():
        secs = [x["caught_up_s"] for x in rs if x["caught_up_s"]]
        if secs:
            med = statistics.median(secs)
            cpu = statistics.median(sum(x["cpu_s"].values()) for x in rs)
            summary["median"][name] = {"caught_up_s": round(med, 2), "mb_per_s": round(rs[0]["logical_mb"] / med, 1),
                                       "cpu_s_all_nodes": round(cpu, 2)}
            print(f"{name}: median {med:.2f} s = {rs[0]['logical_mb'] / med:.1f} MB/s over {len(secs)} runs; "
                  f"median CPU of the three nodes {cpu:.2f} s")
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=1))
    if a.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _local(a: argparse.Namespace, trees: dict[str, str], engine_dir: Path) -> int:
    """``--local``: the in-process stream of one shard, the trees alternating within each round."""
    from raftkv.bench.workloads import key_name

    results: dict[str, list[dict]] = {name: [] for name in trees}
    for r in range(a.rounds):
        for name, tree in trees.items():
            env = dict(os.environ, PYTHONPATH=str(Path(tree).resolve()))
            p = subprocess.run([sys.executable, str(HERE), "--local-trial", str(engine_dir)], env=env,
                               capture_output=True, text=True, cwd=engine_dir.parents[2])
            if p.returncode != 0:
                print(p.stdout, p.stderr, file=sys.stderr)
                return 1
            res = json.loads(p.stdout.strip().splitlines()[-1])
            mb = res["keys"] * (len(key_name(0)) + a.value_size + 8) / 1e6
            res.update(mb=mb, loadavg_1m=os.getloadavg()[0])
            results[name].append(res)
            print(f"round {r + 1} {name}: {res['keys']} keys, leader CPU {res['leader_cpu_s']:.2f} s "
                  f"({mb / res['leader_cpu_s']:.0f} MB/s), follower CPU {res['follower_cpu_s']:.2f} s "
                  f"({mb / res['follower_cpu_s']:.0f} MB/s), wall {res['wall_s']:.2f} s "
                  f"(load {res['loadavg_1m']:.1f})", flush=True)
    summary: dict[str, Any] = {"local": True, "results": results, "median": {}}
    for name, rs in results.items():
        med = {k: round(statistics.median(x[k] for x in rs), 3) for k in ("leader_cpu_s", "follower_cpu_s", "wall_s")}
        summary["median"][name] = med
        print(f"{name}: median leader CPU {med['leader_cpu_s']:.2f} s, follower CPU {med['follower_cpu_s']:.2f} s, "
              f"wall {med['wall_s']:.2f} s over {len(rs)} runs")
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=1))
    return 0


def _retarget(pristine: Path, run: Path) -> None:
    """The copied cluster file names the pristine directory's paths: point them at the copy."""
    cfg = run / "cluster.toml"
    cfg.write_text(cfg.read_text().replace(str(pristine.resolve()), str(run.resolve())))


if __name__ == "__main__":
    sys.exit(main())
