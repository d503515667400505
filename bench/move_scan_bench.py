"""One move's scan (``mv_scan``/``mv_keys``) through a shard's engine store: milliseconds per chunk.

    .venv/bin/python bench/move_scan_bench.py [--keys 50000] [--overlay 10000] [--chunk 250] [--repeat 3]

A shard of ``--keys`` keys of 100 B checkpointed into the engine, then ``--overlay`` of them rewritten (the
writes a replica holds in memory until its next checkpoint, up to ``raftkv serve --compact-every``); then the
keys an add to a fifth shard moves are walked in ``--chunk``-key answers, as the source's leader does for the
pre-copy (values) and the cleanup (keys only). Every answer runs on that node's Raft driver thread.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raftkv.engine import Engine  # noqa: E402
from raftkv.kvstore import EngineStore  # noqa: E402
from raftkv.reshard import Move  # noqa: E402
from raftkv.state import KVState  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=50_000)
    ap.add_argument("--overlay", type=int, default=10_000)
    ap.add_argument("--chunk", type=int, default=250)
    ap.add_argument("--repeat", type=int, default=3, help="walks of each kind (one line each)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        engine = Engine(d)
        store = EngineStore(engine, 0)
        keys = [b"key%08d" % i for i in range(a.keys)]
        for k in keys:
            store[k] = (b"x" * 100, 1)
        frozen = store.freeze()
        engine.commit_now(lambda batch: store.write_checkpoint(batch, frozen))
        store.checkpointed()
        for k in random.Random(1).sample(keys, a.overlay):
            store[k] = (b"y" * 100, 2)
        s = KVState(data=store)
        s.move = Move(1, 0, 4, 128, "frozen")
        for name in [n for n in ("mv_scan", "mv_keys") for _ in range(a.repeat)]:
            t0, after, calls, moved = time.perf_counter(), None, 0, 0
            while True:
                got = s.read((name, 1, after, a.chunk), 0)
                if not isinstance(got, tuple):  # an earlier build (no mv_keys)
                    print(f"{name}: {got}")
                    break
                items, after = got
                calls, moved = calls + 1, moved + len(items)
                if after is None:
                    break
            took = time.perf_counter() - t0
            if not isinstance(got, tuple):
                continue
            print(f"{name}: {moved} moving keys of {a.keys} in {calls} answers, {took * 1000 / calls:.1f} ms per "
                  f"answer ({a.overlay} keys written since the checkpoint)")
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
