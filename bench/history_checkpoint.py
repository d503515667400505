"""What a checkpoint costs a shard that keeps a large transaction history, in-process, no cluster.

    .venv/bin/python bench/history_checkpoint.py --records 100000 --tombstones 240000 --checkpoints 3

Fills one shard's transaction table with finished records and participant tombstones (as ten minutes of a few
hundred cross-shard transactions a second leave), then takes checkpoints with 1,000 new transactions before
each, and prints how long each took (synchronously: the applying thread's part and the engine commit).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raftkv import txn  # noqa: E402
from raftkv.engine import Engine  # noqa: E402
from raftkv.snapshot import ShardSnapshots  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--tombstones", type=int, default=240_000)
    ap.add_argument("--checkpoints", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="raftkv-histckpt-") as d:
        engine = Engine(os.path.join(d, "engine"))
        holder: dict = {}
        snaps = ShardSnapshots(engine, 3, os.path.join(d, "marker"), 4096, lambda: holder["state"],
                               lambda s: holder.__setitem__("state", s))
        holder["state"] = snaps.open_state()
        t = holder["state"].txns
        for i in range(a.records):
            t.records[f"tx-{i:012x}"] = txn.Record(txn.COMMITTED, (0, 1), 1_000_000 + i, branch=True,
                                                   results=(True, True), acked=True, finished_ms=1_000_010 + i)
        for i in range(a.tombstones):
            t.done[f"tx-{i:012x}"] = (txn.COMMITTED, 1_000_000 + i, 0, 1_000_000 + i)
        for n in range(a.checkpoints):
            index = 40 + n
            for i in range(1_000):
                k = f"new-{n}-{i}"
                t.records[k] = txn.Record(txn.COMMITTED, (0, 1), 2_000_000, acked=True, finished_ms=2_000_000)
                t.done[k] = (txn.COMMITTED, 2_000_000, 0, 1)
            t0 = time.perf_counter()
            snaps.serialize((None, ("c", index, 1), ("c", index - 1, 1), set()), index)
            snaps.checkSerializing()
            print(f"checkpoint {n + 1}: {1000 * (time.perf_counter() - t0):.1f} ms "
                  f"({len(t.records):,} records, {len(t.done):,} tombstones)")
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
