"""Benchmark pysyncobj vs raftkv.raftfix.SafeSyncObj on this machine: 3 replicas in 3 processes over loopback TCP.

Measures, with journal + dump files on the local disk:
  * write latency p50/p99 and throughput with 1 and 32 concurrent closed-loop callers (async ``@replicated``
    calls issued *inside the leader's process*, so client RPC costs are excluded), for
    (a) stock SyncObj, default conf (batching on), (b) SafeSyncObj, tuned_conf (batching off), durable=False,
    (c) the same with durable=True (fsync group commit), plus variants batching-on/durable and a 10 ms
    appendEntriesPeriod;
  * the journal flush (msync+fsync) latency measured inside the replicas;
  * failover: kill -9 the leader, time until a write through a surviving replica succeeds; stock SyncObj with
    default timers vs SafeSyncObj with tuned_conf (keepalive on), 5 trials each, median and worst.

Run: ``.venv/bin/python bench/raft_bench.py [--duration 3] [--trials 5] [--skip-failover]``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pysyncobj import SyncObj, SyncObjConf, replicated  # noqa: E402

from raftkv.raftfix import SafeSyncObj, tuned_conf  # noqa: E402

VALUE = b"x" * 100


class StockKV(SyncObj):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.data: dict[Any, bytes] = {}
        super().__init__(*args, **kwargs)

    @replicated
    def set(self, key: Any, value: bytes) -> None:
        self.data[key] = value


class SafeKV(SafeSyncObj):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.data: dict[Any, bytes] = {}
        super().__init__(*args, **kwargs)

    @replicated
    def set(self, key: Any, value: bytes) -> None:
        self.data[key] = value


# name -> (class, conf kwargs builder, SafeSyncObj kwargs)
def make_conf(mode: str, workdir: str) -> tuple[type, SyncObjConf, dict[str, Any]]:
    files = {"journalFile": os.path.join(workdir, "journal"), "fullDumpFile": os.path.join(workdir, "dump")}
    if mode == "stock-batch":
        return StockKV, SyncObjConf(**files), {}
    if mode == "stock-timers":  # failover baseline: stock class, stock timers
        return StockKV, SyncObjConf(**files), {}
    if mode == "safe-nobatch":
        return SafeKV, tuned_conf(**files), {"durable": False}
    if mode == "safe-nobatch-durable":
        return SafeKV, tuned_conf(**files), {"durable": True}
    if mode == "safe-batch-durable":
        return SafeKV, SyncObjConf(**files), {"durable": True}
    if mode == "safe-batch10ms-durable":
        return SafeKV, tuned_conf(appendEntriesUseBatch=True, appendEntriesPeriod=0.01, **files), {"durable": True}
    if mode == "safe-tuned":  # failover: tuned timers + keepalive
        return SafeKV, tuned_conf(**files), {"durable": True}
    raise ValueError(mode)


def node_main(idx: int, addrs: list[str], mode: str, workdir: str, conn: Connection) -> None:
    """Child process: one replica, constructed on this (long-lived) main thread, driven over a pipe."""
    cls, conf, extra = make_conf(mode, workdir)
    obj = cls(addrs[idx], [a for a in addrs if a != addrs[idx]], conf, **extra)
    while True:
        cmd, *args = conn.recv()
        if cmd == "status":
            conn.send((obj._isLeader(), str(obj._getLeader()), obj.raftCommitIndex))
        elif cmd == "load":
            conn.send(run_load(obj, *args))
        elif cmd == "write":
            conn.send(try_write(obj, *args))
        elif cmd == "flush":
            stats = obj.flushStats() if isinstance(obj, SafeSyncObj) else None
            conn.send(None if stats is None else (stats.count, stats.total_s, stats.max_s))
        elif cmd == "stop":
            conn.send(None)
            return


def try_write(obj: Any, timeout_s: float) -> bool:
    try:
        obj.set("probe", VALUE, sync=True, timeout=timeout_s)
        return True
    except Exception:
        return False


def run_load(obj: Any, callers: int, duration_s: float) -> tuple[list[float], dict[int, int]]:
    """Closed loop: each caller re-issues as soon as its previous write completes (callbacks run on the tick
    thread; issuing only enqueues)."""
    latencies: list[float] = []
    errors: dict[int, int] = {}  # FAIL_REASON -> count
    deadline = time.perf_counter() + duration_s
    live = [callers]
    done = threading.Event()
    lock = threading.Lock()

    def issue(i: int) -> None:
        t0 = time.perf_counter()

        def cb(_res: Any, err: int) -> None:
            now = time.perf_counter()
            if err == 0:
                latencies.append(now - t0)
            else:
                errors[err] = errors.get(err, 0) + 1
            if now < deadline:
                issue(i)
            else:
                with lock:
                    live[0] -= 1
                    if live[0] == 0:
                        done.set()

        obj.set(i, VALUE, callback=cb)

    for i in range(callers):
        issue(i)
    done.wait(duration_s + 15)
    return latencies, errors


class Group:
    """Three replica processes on fresh ports and a fresh directory."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.root = tempfile.mkdtemp(prefix="raftbench-", dir=os.environ.get("RAFTBENCH_DIR"))
        self.addrs = [f"127.0.0.1:{free_port()}" for _ in range(3)]
        self.procs: list[mp.Process] = []
        self.conns: list[Connection] = []
        ctx = mp.get_context("fork")
        for i in range(3):
            workdir = os.path.join(self.root, str(i))
            os.makedirs(workdir)
            parent, child = ctx.Pipe()
            p = ctx.Process(target=node_main, args=(i, self.addrs, mode, workdir, child), daemon=True)
            p.start()
            self.procs.append(p)
            self.conns.append(parent)
        self.started = time.perf_counter()

    def call(self, i: int, *msg: Any) -> Any:
        self.conns[i].send(msg)
        return self.conns[i].recv()

    def leader(self, timeout_s: float = 20.0, among: list[int] | None = None) -> int:
        deadline = time.perf_counter() + timeout_s
        while time.perf_counter() < deadline:
            for i in among or range(3):
                if self.call(i, "status")[0]:
                    return i
            time.sleep(0.02)
        raise RuntimeError(f"{self.mode}: no leader")

    def close(self) -> None:
        for i, p in enumerate(self.procs):
            if p.is_alive():
                try:
                    self.call(i, "stop")
                except (OSError, EOFError):
                    pass
                p.kill()
            p.join(5)
        shutil.rmtree(self.root, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def bench_throughput(mode: str, duration_s: float) -> list[dict[str, Any]]:
    g = Group(mode)
    rows = []
    try:
        lead = g.leader()
        time.sleep(1.0)
        g.call(lead, "load", 1, 0.5)  # warm-up
        for callers in (1, 32):
            lat, errors = g.call(lead, "load", callers, duration_s)
            rows.append({
                "mode": mode, "callers": callers, "ops_s": len(lat) / duration_s,
                "p50_ms": pct(lat, 0.5) * 1e3, "p99_ms": pct(lat, 0.99) * 1e3, "errors": ",".join(f"{k}:{v}" for k, v in sorted(errors.items())) or "0",
            })
        flush = [g.call(i, "flush") for i in range(3)]
        for row in rows:
            row["flush"] = flush
    finally:
        g.close()
    return rows


def bench_failover(mode: str, age_s: float, probe_timeout_s: float) -> float:
    g = Group(mode)
    try:
        lead = g.leader()
        time.sleep(max(0.0, age_s - (time.perf_counter() - g.started)))
        survivor = (lead + 1) % 3
        t0 = time.perf_counter()
        g.procs[lead].kill()
        while not g.call(survivor, "write", probe_timeout_s):
            if time.perf_counter() - t0 > 60:
                return float("inf")
        return time.perf_counter() - t0
    finally:
        g.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=3.0, help="seconds per load point")
    ap.add_argument("--trials", type=int, default=5, help="failover trials per config")
    ap.add_argument("--skip-failover", action="store_true")
    ap.add_argument("--skip-load", action="store_true")
    args = ap.parse_args()
    print(f"# raft_bench: 3 processes, loopback TCP, journal+dump in {tempfile.gettempdir()}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    if not args.skip_load:
        print("\n| config | callers | ops/s | p50 ms | p99 ms | errors | flushes (n, mean ms, max ms) per node |")
        print("|---|---|---|---|---|---|---|")
        for mode in ("stock-batch", "safe-nobatch", "safe-nobatch-durable", "safe-batch-durable",
                     "safe-batch10ms-durable"):
            for row in bench_throughput(mode, args.duration):
                flush = "; ".join(
                    "-" if f is None else f"{f[0]}, {1e3 * f[1] / max(f[0], 1):.2f}, {1e3 * f[2]:.1f}"
                    for f in row["flush"])
                print(f"| {row['mode']} | {row['callers']} | {row['ops_s']:.0f} | {row['p50_ms']:.2f} | "
                      f"{row['p99_ms']:.2f} | {row['errors']} | {flush} |", flush=True)
    if not args.skip_failover:
        print("\n| failover config | cluster age at kill | trials (s) | median s | worst s |")
        print("|---|---|---|---|---|")
        for mode, age, probe in (("stock-timers", 8.0, 0.3), ("safe-tuned", 3.0, 0.15)):
            res = [bench_failover(mode, age, probe) for _ in range(args.trials)]
            print(f"| {mode} | {age:.0f} s | {', '.join(f'{r:.2f}' for r in res)} | "
                  f"{statistics.median(res):.2f} | {max(res):.2f} |", flush=True)


if __name__ == "__main__":
    main()
