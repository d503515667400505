"""Scale: put/get throughput and p99 vs shards (1, 3, 6) and vs keys loaded (10k, 100k, 1M);
RSS per node per million keys; restart-and-catch-up time of a node with 1M keys.

    .venv/bin/python bench/scale.py --json bench/results/scale.json

The same command as ``raftkv bench scale`` (options: ``--help``).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raftkv.bench.cli import scale_cmd  # noqa: E402

if __name__ == "__main__":
    scale_cmd.main(prog_name="bench/scale.py")
