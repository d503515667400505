"""kill -9 a shard leader under put load N times: time from the kill to the first successful write (and etcd's).

    .venv/bin/python bench/failover.py --trials 10 --json bench/results/failover.json

The same command as ``raftkv bench failover`` (options: ``--help``).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raftkv.bench.cli import failover_cmd  # noqa: E402

if __name__ == "__main__":
    failover_cmd.main(prog_name="bench/failover.py")
