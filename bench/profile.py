"""Where a node's time goes under the 32-client put load: py-spy (if on PATH) on every node process.

    .venv/bin/python bench/profile.py --seconds 10 --out bench/results/profile

Prints, per node and summed, the functions with the most samples (self time, and inclusive time for
raftkv/pysyncobj/asyncio frames) and writes py-spy's collapsed stacks (flamegraph input) to OUT-<node>.txt.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raftkv.bench.load import LoadParams, LoadRun  # noqa: E402
from raftkv.bench.preload import preload  # noqa: E402
from raftkv.bench.report import fmt_row  # noqa: E402
from raftkv.bench.systems import RaftKVSystem  # noqa: E402


def summarize(paths: list[str], top: int) -> str:
    self_c: collections.Counter = collections.Counter()
    incl_c: collections.Counter = collections.Counter()
    total = 0
    for p in paths:
        for line in open(p):
            stack, _, n = line.rstrip("\n").rpartition(" ")
            if not n.isdigit():
                continue
            n = int(n)
            total += n
            frames = stack.split(";")
            self_c[_short(frames[-1])] += n
            for f in {_short(f) for f in frames}:
                incl_c[f] += n
    out = [f"samples: {total}", "", f"top {top} self (leaf) frames:"]
    out += [f"  {100 * c / total:5.1f}%  {f}" for f, c in self_c.most_common(top)]
    out += ["", f"top {top} inclusive frames:"]
    out += [f"  {100 * c / total:5.1f}%  {f}" for f, c in incl_c.most_common(top)]
    return "\n".join(out)


def _short(frame: str) -> str:
    # py-spy raw frames: "function (path/to/file.py:line)"
    name, _, loc = frame.partition(" (")
    loc = loc.rstrip(")")
    path, _, _line = loc.rpartition(":")
    parts = path.split("/")
    short = "/".join(parts[-2:]) if parts else path
    return f"{name} ({short})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--workload", default="put")
    ap.add_argument("--out", default="bench/results/profile")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--shards", type=int, default=3, help="shards of the 3-node cluster")
    ap.add_argument("--gil", action="store_true",
                    help="sample only threads holding the GIL: where the nodes' Python CPU goes, without waits")
    a = ap.parse_args()
    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(spy):
        print("py-spy not found (pip install py-spy); nothing to do")
        return 1
    d = tempfile.mkdtemp(prefix="raftkv-profile-")
    s = RaftKVSystem(d, shards=a.shards)
    try:
        preload(s, 10_000)
        run = LoadRun(s, LoadParams(a.workload, a.clients, a.seconds + 3, warmup=1.0)).start()
        import time

        time.sleep(2.0)
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        procs, paths = [], []
        for name, pid in s.node_pids().items():
            path = f"{a.out}-{name}.txt"
            paths.append(path)
            procs.append(subprocess.Popen([spy, "record", "-p", str(pid), "-d", str(int(a.seconds)), "-r", "200",
                                           "-f", "raw", "-o", path, "--threads", "--nonblocking",
                                           *(["--gil"] if a.gil else [])],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        for p in procs:
            _, err = p.communicate()
            if p.returncode:
                print(f"py-spy failed: {err.decode()[-300:]}")
        r = run.finish()
        print(fmt_row(r.row()))
        ok = [p for p in paths if os.path.exists(p)]
        print(summarize(ok, a.top))
    finally:
        s.stop()
        shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
