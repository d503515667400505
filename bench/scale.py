"""Scale: put/get throughput and p99 vs shards (1, 3, 6) and vs keys loaded (10k, 100k, 1M);
RSS per node per million keys; restart-and-catch-up time of a node with 1M keys.

    .venv/bin/python bench/scale.py --json bench/results/scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raftkv.bench import run_scale  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", default="1,3,6")
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--value-size", type=int, default=100)
    ap.add_argument("--json")
    a = ap.parse_args()
    doc = run_scale(tuple(int(x) for x in a.shards.split(",") if x),
                    tuple(int(x) for x in a.sizes.split(",") if x),
                    clients=a.clients, duration=a.duration, value_size=a.value_size)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(doc, indent=1))
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
