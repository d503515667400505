"""kill -9 a shard leader under put load N times: time from the kill to the first successful write (and etcd's).

    .venv/bin/python bench/failover.py --trials 10 --json bench/results/failover.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raftkv.bench import run_failover  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--peers", default="etcd", help="'etcd' or 'none'")
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument("--load-clients", type=int, default=8)
    ap.add_argument("--settle", type=float, default=5.0, help="seconds between a restart and the next kill")
    ap.add_argument("--skip-raftkv", action="store_true", help="only the peers")
    ap.add_argument("--json")
    a = ap.parse_args()
    peers = () if a.peers == "none" else tuple(p for p in a.peers.split(",") if p)
    doc = run_failover(a.trials, systems=(() if a.skip_raftkv else ("raftkv",)) + peers, shards=a.shards, load_clients=a.load_clients,
                       settle=a.settle)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(doc, indent=1))
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
