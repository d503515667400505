"""What an fdatasync costs on this disk, by how the bytes before it were written: N pages of 4 KiB at random
places in a 100 MiB file (what a B+tree commit writes: every dirtied leaf and its path to the root) against the
same bytes appended in sequence (what a write-ahead log writes).

    .venv/bin/python bench/fsync_bench.py [--dir DIR] [--rounds 200] [--pages 1,8,50]

Prints the p50 and p90 of the fdatasync alone (the writes before it are not timed). The file is made in DIR
(default: the repository, i.e. the filesystem a node's data directory is on) and removed afterwards.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

PAGE = 4096
FILE_BYTES = 100 << 20


def measure(fd: int, pages: int, rounds: int, scattered: bool) -> tuple[float, float]:
    """p50 and p90 (ms) of ``fdatasync`` after writing ``pages`` pages, scattered or in sequence."""
    times = []
    offset = 0
    slots = FILE_BYTES // PAGE
    for _ in range(rounds):
        if scattered:
            for _ in range(pages):
                os.pwrite(fd, os.urandom(PAGE), random.randrange(slots) * PAGE)
        else:
            if offset + pages * PAGE > FILE_BYTES:
                offset = 0
            os.pwrite(fd, os.urandom(pages * PAGE), offset)
            offset += pages * PAGE
        t = time.perf_counter()
        os.fdatasync(fd)
        times.append(time.perf_counter() - t)
    times.sort()
    return 1000 * times[len(times) // 2], 1000 * times[len(times) * 9 // 10]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--pages", default="1,8,50", help="comma list of page counts per fdatasync")
    a = ap.parse_args(argv)
    fd, path = tempfile.mkstemp(prefix=".fsync-bench-", dir=a.dir)
    try:
        os.pwrite(fd, b"\1" * FILE_BYTES, 0)  # allocated up front: no fdatasync below has to grow the file
        os.fsync(fd)
        print(f"fdatasync on {a.dir} ({a.rounds} rounds each; ms p50 / p90)")
        for n in (int(x) for x in a.pages.split(",")):
            sp50, sp90 = measure(fd, n, a.rounds, scattered=True)
            qp50, qp90 = measure(fd, n, a.rounds, scattered=False)
            print(f"  {n:3d} pages ({n * 4} KiB): scattered {sp50:.3f} / {sp90:.3f}   in sequence {qp50:.3f} / "
                  f"{qp90:.3f}   ratio {sp50 / qp50:.1f}x")
    finally:
        os.close(fd)
        os.unlink(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
