"""Puts at 32 clients on a cluster holding N keys, with each node's engine commits and checkpoints.

    .venv/bin/python bench/loaded_puts.py --keys 10000000 [--rounds 2] [--seconds 6] [--node-arg=--compact-every=2000]
    RAFTKV_ENGINE=rocksdb .venv/bin/python bench/loaded_puts.py --keys 3000000

A fresh 3-node, 3-shard cluster is bulk-loaded (``Client.put_many``, the benchmarks' preload), left alone for
2 s, then driven with 32-client puts for ``--rounds`` rounds. Around each round every node's ``RAFTKV.STATUS``
engine counters are read, so the round prints each node's engine commits, their mean time and the share of
the round the driver spent in them; at the end, each node's checkpoints during the rounds (keys written,
ms; from its log) and its slow driver iterations. ``raftkv bench scale`` measures one short point right
after the load; this separates the steady state from what follows the load.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raftkv.bench.load import LoadParams, run_load  # noqa: E402
from raftkv.bench.preload import preload  # noqa: E402
from raftkv.bench.systems import RaftKVSystem  # noqa: E402

CHECKPOINT = re.compile(r"event=checkpoint shard=(\d+) index=\d+ keys_written=(\d+) meta_bytes=\d+ ms=([\d.]+)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--node-arg", action="append", default=[], help="extra 'raftkv serve' argument (repeatable)")
    args = ap.parse_args()
    d = tempfile.mkdtemp(prefix="raftkv-loaded-")
    try:
        s = RaftKVSystem(d, shards=3, node_args=args.node_arg)
        lc = s.lc
        try:
            secs = preload(s, args.keys, 100)
            print(f"loaded {args.keys} keys in {secs:.1f} s ({args.keys / secs:.0f} keys/s)", flush=True)
            time.sleep(2)
            marks = {f: os.path.getsize(f) for f in glob.glob(os.path.join(d, "*.log"))}
            for rnd in range(args.rounds):
                before = {n: st["engine"] for n, st in lc.shard_views().items()}
                t0 = time.monotonic()
                r = run_load(s, LoadParams("put", args.clients, args.seconds, keyspace=args.keys)).row()
                wall = time.monotonic() - t0
                after = {n: st["engine"] for n, st in lc.shard_views().items()}
                per = []
                for n in sorted(before.keys() & after.keys()):
                    c = after[n]["commits"] - before[n]["commits"]
                    t = after[n]["commit_s"] - before[n]["commit_s"]
                    per.append(f"{n} {c} commits, mean {1000 * t / max(c, 1):.2f} ms, {t / wall:.0%} of the time")
                print(f"round {rnd}: {r['ops_s']:.0f} puts/s, p99 {r['p99_ms']} ms | " + "; ".join(per), flush=True)
            for f, off in sorted(marks.items()):
                with open(f, errors="replace") as fh:
                    fh.seek(off)
                    text = fh.read()
                cps = [f"shard {a}: {b} keys in {float(c):.0f} ms" for a, b, c in CHECKPOINT.findall(text)]
                slow = [int(x) for x in re.findall(r"event=driver_slow_iteration busy_ms=(\d+)", text)]
                print(f"{os.path.basename(f)[:-4]}: checkpoints during the rounds: {', '.join(cps) or 'none'}; "
                      f"driver iterations over 50 ms: {len(slow)}, longest {max(slow, default=0)} ms")
        finally:
            s.stop()
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
