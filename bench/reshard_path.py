"""Walk a cluster through shard counts online (e.g. 4 -> 8 -> 5) under writes and reads, and check every key.

Usage: ``python bench/reshard_path.py [--keys N] [--path 4,8,5] [--value-size B] [--writers W] [--readers R]``

Creates a loopback cluster (3 nodes, the first count of ``--path`` shards), preloads N keys of B bytes
(``Client.put_many``), then starts W writer threads and R reader threads and runs ``raftkv shard add``
or ``raftkv shard remove`` until the cluster has each count of the path in turn. Every writer owns its
own keys (``w<i>-<k>``, 500 each) and writes them ``seq`` values that only grow; a reader reads a
writer's key and checks it never sees a value older than one acknowledged before the read began (no
stale read, no lost write). Per step it prints the command's summary (keys moved, the fraction, the
phases) and the writers' latency during it. At the end every preloaded key must read back unchanged,
every writer key must hold its last acknowledged value (or the one in flight when the writer stopped),
each shard's replicas must agree (``RAFTKV.HASHKV``), and the shards' key counts must add up to the
keys written: none lost, none stored twice. Every node runs on this one machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import tempfile
import threading
import time
from typing import Any

from raftkv import Client
from raftkv.bench.hist import summary_ms
from raftkv.bench.preload import preload
from raftkv.bench.scaleout import keys_per_shard, read_back, run_cli
from raftkv.bench.systems import RaftKVSystem
from raftkv.bench.workloads import make_value
from raftkv.cluster import LocalCluster
from shards.shardmap import ShardMap

KEYS_PER_WRITER = 500


class Writer(threading.Thread):
    """Writes ``seq`` (growing) to its own keys; remembers what was acknowledged and what is in flight."""

    def __init__(self, i: int, config: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.i, self.config, self.stop = i, config, stop
        self.acked: dict[str, int] = {}  # key -> the last acknowledged seq
        self.inflight: tuple[str, int] | None = None
        self.samples: list[tuple[float, float]] = []  # (start, latency)
        self.errors: list[str] = []

    def key(self, k: int) -> str:
        return f"w{self.i}-{k}"

    def run(self) -> None:
        rng = random.Random(self.i)
        seq = 0
        with Client(cluster=self.config, timeout=60.0) as c:
            while not self.stop.is_set():
                seq += 1
                key = self.key(rng.randrange(KEYS_PER_WRITER))
                self.inflight = (key, seq)
                t = time.monotonic()
                try:
                    c.put(key, str(seq))
                except Exception as e:  # noqa: BLE001 - reported at the end; an unknown outcome stays in flight
                    self.errors.append(f"{type(e).__name__}: {e}")
                    return
                self.samples.append((t, time.monotonic() - t))
                self.acked[key] = seq
                self.inflight = None


class Reader(threading.Thread):
    """Reads the writers' keys; a value older than one acknowledged before the read began is a stale read."""

    def __init__(self, i: int, config: str, writers: list[Writer], stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.i, self.config, self.writers, self.stop = i, config, writers, stop
        self.reads = 0
        self.stale: list[str] = []
        self.errors: list[str] = []

    def run(self) -> None:
        rng = random.Random(100 + self.i)
        with Client(cluster=self.config, timeout=60.0) as c:
            while not self.stop.is_set():
                w = rng.choice(self.writers)
                key = w.key(rng.randrange(KEYS_PER_WRITER))
                floor = w.acked.get(key, 0)
                try:
                    got = c.get(key)
                except Exception as e:  # noqa: BLE001
                    self.errors.append(f"{type(e).__name__}: {e}")
                    return
                self.reads += 1
                if (0 if got is None else int(got)) < floor:
                    self.stale.append(f"{key}: read {got!r} after seq {floor} was acknowledged")


def _lat(samples: list[tuple[float, float]], lo: float, hi: float) -> dict[str, float]:
    """Latency of the writes begun in [lo, hi), and when the slowest began (s after the window's first write)."""
    inside = [(t, d) for t, d in samples if lo <= t < hi]
    out = summary_ms(d for _t, d in inside)
    if inside:
        out["max_at_s"] = round(max(inside, key=lambda td: td[1])[0] - min(t for t, _d in inside), 2)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--path", default="4,8,5", help="shard counts to walk through, the first is the start")
    ap.add_argument("--value-size", type=int, default=100)
    ap.add_argument("--writers", type=int, default=2)
    ap.add_argument("--readers", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the summary here")
    ap.add_argument("--move-arg", action="append", default=[], metavar="ARG",
                    help="an extra 'raftkv shard add|remove' argument (repeat: --move-arg=--pace --move-arg=0.3)")
    ap.add_argument("--keep", default=None, metavar="DIR",
                    help="run the cluster in DIR (created; kept afterwards, with the nodes' logs) instead of a "
                         "temporary directory")
    ap.add_argument("--node-arg", action="append", default=[], metavar="ARG",
                    help="an extra 'raftkv serve' argument for every node (repeat: --node-arg=--compact-every "
                         "--node-arg=2500)")
    a = ap.parse_args()
    path = [int(x) for x in a.path.split(",")]
    summary: dict[str, Any] = {"keys": a.keys, "path": path, "value_size": a.value_size, "node_args": a.node_arg,
                               "move_args": a.move_arg, "steps": []}
    with (contextlib.nullcontext(a.keep) if a.keep else tempfile.TemporaryDirectory(prefix="reshard-path-")) as tmp:
        system = RaftKVSystem(tmp, shards=path[0], nodes=3, node_args=a.node_arg or None)
        lc = system.lc
        config = str(lc.config)
        try:
            summary["preload_s"] = round(preload(system, a.keys, a.value_size), 1)
            print(f"preloaded {a.keys} keys of {a.value_size} B on {path[0]} shards in {summary['preload_s']} s",
                  flush=True)
            stop = threading.Event()
            writers = [Writer(i, config, stop) for i in range(a.writers)]
            readers = [Reader(i, config, writers, stop) for i in range(a.readers)]
            for t in (*writers, *readers):
                t.start()
            time.sleep(3.0)
            samples = lambda: [s for w in writers for s in w.samples]  # noqa: E731
            summary["before"] = _lat(samples(), 0, time.monotonic())
            for target in path[1:]:
                while (n := ShardMap.load(config).nshards) != target:
                    verb = "add" if n < target else "remove"
                    t0 = time.monotonic()
                    took, out = run_cli("shard", verb, "--cluster", config, *a.move_arg)
                    line = out.strip().splitlines()[-1]
                    step = {"command": f"shard {verb}", "from": n, "to": ShardMap.load(config).nshards,
                            "seconds": round(took, 1), "summary": line, "writers": _lat(samples(), t0, t0 + took)}
                    summary["steps"].append(step)
                    print(f"{n} -> {step['to']} shards ({took:.1f} s): {line}; writers during it: {step['writers']}",
                          flush=True)
            time.sleep(1.0)
            stop.set()
            for t in (*writers, *readers):
                t.join(60)
            errors = [e for t in (*writers, *readers) for e in t.errors]
            stale = [s for r in readers for s in r.stale]
            summary["reads"] = sum(r.reads for r in readers)
            summary["writes"] = sum(len(w.samples) for w in writers)
            # Every preloaded key is untouched by the writers: it must read back as preloaded.
            m = ShardMap.load(config)
            addrs = [n.client_addr for n in m.nodes.values()]
            back = read_back(addrs, a.keys, make_value(a.value_size))
            lost = []
            with Client(cluster=config, timeout=60.0) as c:
                for w in writers:
                    for key, seq in w.acked.items():
                        got = c.get(key)
                        allowed = {seq} | ({w.inflight[1]} if w.inflight and w.inflight[0] == key else set())
                        if got is None or int(got) not in allowed:
                            lost.append(f"{key}: {got!r}, acknowledged {seq}")
            written = a.keys + sum(len(w.acked) for w in writers)
            counts = keys_per_shard(LocalCluster(lc.dir))
            agree = all(len(v) == 1 for v in counts.values())
            stored = sum(v[0] for v in counts.values())
            summary.update(errors=errors, stale_reads=len(stale), preloaded_read_back=back, writer_keys_lost=lost,
                           keys_per_shard={s: v for s, v in sorted(counts.items())}, keys_written=written,
                           keys_stored=stored, replicas_agree=agree)
            ok = not errors and not stale and back["ok"] == a.keys and not lost and agree and stored == written
            summary["ok"] = ok
            print(json.dumps({k: summary[k] for k in ("reads", "writes", "stale_reads", "preloaded_read_back",
                                                       "keys_written",
                                                       "keys_stored", "replicas_agree", "ok")}))
            if errors or stale or lost:
                print("errors:", errors[:5], "stale:", stale[:5], "lost:", lost[:5])
            if a.json:
                with open(a.json, "w") as f:
                    json.dump(summary, f, indent=1)
            return 0 if ok else 1
        finally:
            LocalCluster(lc.dir).stop()
            lc.stop()


if __name__ == "__main__":
    sys.exit(main())
