"""Linearizable reads: ReadIndex (``SafeSyncObj.readIndex``) vs a read through the Raft log.

3 ``SafeSyncObj`` replicas (tuned_conf, durable=True, journal + dump on the local disk) in 3 processes over
loopback TCP. Inside the leader's process (client RPC costs excluded), closed-loop callers issue reads of one
key for ``--duration`` seconds at 1 and 32 callers:

* ``log``: a ``@replicated`` get (one log entry per read: journal append + fsync + replication), which is what
  raftkv's ("get", key) command costs today;
* ``readindex``: ``readIndex(cb)`` and the dict lookup inside ``cb`` (one heartbeat round, no disk write).

Run: ``.venv/bin/python bench/readindex_bench.py [--duration 3]``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pysyncobj import replicated  # noqa: E402

from raftkv.raftfix import SafeSyncObj, tuned_conf  # noqa: E402


class KV(SafeSyncObj):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.data: dict[Any, bytes] = {}
        super().__init__(*args, **kwargs)

    @replicated
    def set(self, key: Any, value: bytes) -> None:
        self.data[key] = value

    @replicated
    def get(self, key: Any) -> bytes | None:
        return self.data.get(key)


def node_main(idx: int, addrs: list[str], workdir: str, conn: Connection) -> None:
    conf = tuned_conf(journalFile=os.path.join(workdir, "journal"), fullDumpFile=os.path.join(workdir, "dump"))
    obj = KV(addrs[idx], [a for a in addrs if a != addrs[idx]], conf, durable=True)
    while True:
        cmd, *args = conn.recv()
        if cmd == "status":
            conn.send(obj._isLeader())
        elif cmd == "set":
            obj.set("k", b"v" * 100, sync=True, timeout=5)
            conn.send(None)
        elif cmd == "load":
            conn.send(run_load(obj, *args))
        elif cmd == "stats":
            stats = obj.flushStats()
            conn.send((obj.readIndexStats(), stats.count))
        elif cmd == "stop":
            conn.send(None)
            return


def run_load(obj: KV, mode: str, callers: int, duration_s: float) -> tuple[list[float], int]:
    latencies: list[float] = []
    errors = [0]
    deadline = time.perf_counter() + duration_s
    live = [callers]
    done = threading.Event()
    lock = threading.Lock()

    def issue() -> None:
        t0 = time.perf_counter()

        def finish(ok: bool) -> None:
            now = time.perf_counter()
            if ok:
                latencies.append(now - t0)
            else:
                errors[0] += 1
            if now < deadline:
                issue()
            else:
                with lock:
                    live[0] -= 1
                    if live[0] == 0:
                        done.set()

        if mode == "log":
            obj.get("k", callback=lambda res, err: finish(err == 0 and res is not None))
        else:
            obj.readIndex(lambda _idx, err: finish(err == 0 and obj.data.get("k") is not None))

    for _ in range(callers):
        issue()
    done.wait(duration_s + 15)
    return latencies, errors[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=3.0)
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="readindex-bench-", dir=os.environ.get("RAFTBENCH_DIR"))
    addrs = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    ctx = mp.get_context("fork")
    procs, conns = [], []
    for i in range(3):
        os.makedirs(os.path.join(root, str(i)))
        parent, child = ctx.Pipe()
        p = ctx.Process(target=node_main, args=(i, addrs, os.path.join(root, str(i)), child), daemon=True)
        p.start()
        procs.append(p)
        conns.append(parent)

    def call(i: int, *msg: Any) -> Any:
        conns[i].send(msg)
        return conns[i].recv()

    try:
        lead = None
        deadline = time.perf_counter() + 20
        while lead is None and time.perf_counter() < deadline:
            lead = next((i for i in range(3) if call(i, "status")), None)
            time.sleep(0.02)
        assert lead is not None, "no leader"
        time.sleep(1.0)
        call(lead, "set")
        print(f"# readindex_bench: 3 processes, loopback TCP, durable journals in {tempfile.gettempdir()}, "
              f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
        print("\n| read path | callers | reads/s | p50 ms | p99 ms | errors | leader fsyncs/read | reads/round |")
        print("|---|---|---|---|---|---|---|---|")
        for mode in ("log", "readindex"):
            call(lead, "load", mode, 1, 0.5)  # warm-up
            for callers in (1, 32):
                before = call(lead, "stats")
                lat, errors = call(lead, "load", mode, callers, args.duration)
                after = call(lead, "stats")
                n = max(len(lat), 1)
                rounds = after[0]["rounds"] - before[0]["rounds"]
                per_round = f"{len(lat) / rounds:.1f}" if rounds else "-"
                print(f"| {mode} | {callers} | {len(lat) / args.duration:.0f} | {pct(lat, 0.5) * 1e3:.2f} | "
                      f"{pct(lat, 0.99) * 1e3:.2f} | {errors} | {(after[1] - before[1]) / n:.2f} | {per_round} |",
                      flush=True)
    finally:
        for i, p in enumerate(procs):
            try:
                call(i, "stop")
            except (OSError, EOFError):
                pass
            p.kill()
            p.join(5)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
