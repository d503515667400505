"""Storage engine candidates (LMDB, RocksDB) measured with raftkv's access pattern.

    .venv/bin/python bench/engine_bench.py [--duration 3] [--reps 3] [--json PATH]

Needs ``lmdb`` (a main dependency) and, for RocksDB, ``rocksdict`` (the ``bench`` extra:
``pip install -e '.[bench]'``); an engine whose package is missing is skipped with a note.
Every measurement runs in a forked child process on a fresh directory under ``--dir``
(default: the repository root, so the same filesystem as a node's data directory), which
is removed afterwards.  Repetitions interleave the engines, workload by workload.

Workloads (keys: log ``b"L" + u32 group + u64 index``, hard state ``b"H" + u32 group``,
applied index ``b"A" + u32 group``, data ``u32 shard + key``, all big-endian):

* ``group_commit_G{n}``: one tick appends 1-4 entries of 200 B to each of G groups plus each
  group's hard state (term, vote, commit) in ONE atomic batch with ONE durable commit
  (LMDB: one write txn, env opened with sync=True; RocksDB: one WriteBatch, sync=True);
  ticks/s, entries/s, p50/p99 tick latency (building the batch included), and the bytes the
  process wrote to the disk per entry (``/proc/self/io``; RocksDB's memtable flush and
  compactions come later than a short run, so its figure is the WAL's).
* ``tick_G{n}``: what a node's driver loop commits: 24 client writes spread over G groups, each as a
  200 B log entry, a 100 B data key and a 30 B session record at random places, plus every touched
  group's hard state and applied index, in ONE durable commit; ticks/s and p50/p99 latency.
  RocksDB runs with raftkv's own settings (``raftkv.rocksstore.options``) in every workload.
* ``apply_sync`` / ``apply_nosync``: 100 random data keys of 100 B plus the group's applied
  index in one atomic commit, durable or not; keys/s.
* ``prefix_delete``: the group log holds ``--log-entries`` entries of 200 B; the first half
  is deleted in one atomic durable commit (LMDB: cursor deletes in one txn; RocksDB:
  DeleteRange in one WriteBatch); ms, plus the ms of the next seek to the first entry
  (what a Raft log asks right after compaction; RocksDB meets its range tombstone there).
* ``bulk_load``: ``--keys`` data keys of 100 B over ``--shards`` shards in key order (a
  snapshot install or restore streams keys in order), ``--batch`` keys per durable commit;
  keys/s, bytes on disk afterwards (allocated blocks; RocksDB after a memtable flush),
  the process RSS and its anonymous part (LMDB's mapped pages count in RSS as file pages:
  page cache the kernel can drop, not heap).
* ``point_reads``: random keys of the loaded set (LMDB: one read txn per 1000 reads); reads/s.
* ``scan``: every key of one shard in order (``--keys / --shards`` keys); keys/s.  The RSS is
  taken again after the reads and the scan (``after_reads_rss*``): LMDB's file pages they touched
  are in it by then.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import random
import resource
import shutil
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINES = ("lmdb", "rocksdb")
# not in the default set: LMDB without the meta-page fdatasync (one sync per commit instead of two; the last
# commit can be lost on power loss, so not durable enough for a Raft log, measured only to size that sync)
VARIANTS = ("lmdb-nometasync",)
WORKLOADS = ("group_commit", "tick", "apply", "prefix_delete", "dataset")

_U32 = struct.Struct(">I")
_LOGKEY = struct.Struct(">cIQ")
_GROUPKEY = struct.Struct(">cI")
_HARD = struct.Struct(">QQQ")  # term, vote (node id), commit index
_U64 = struct.Struct(">Q")

_RANDOM = random.Random(11).randbytes(1 << 20)  # incompressible payload source, same for every engine


def payload(i: int, size: int) -> bytes:
    off = (i * 211) % (len(_RANDOM) - size)
    return _RANDOM[off:off + size]


def log_key(group: int, index: int) -> bytes:
    return _LOGKEY.pack(b"L", group, index)


def data_key(shard: int, j: int) -> bytes:
    return _U32.pack(shard) + b"key:%010d" % j


# --------------------------------------------------------------------------- engines


class LMDBEngine:
    name = "lmdb"

    def __init__(self, path: str, sync: bool, map_size: int, metasync: bool = True) -> None:
        import lmdb

        self.env = lmdb.open(path, map_size=map_size, sync=sync, metasync=sync and metasync, subdir=True, max_dbs=0)

    def commit(self, puts: Iterable[tuple[bytes, bytes]]) -> None:
        with self.env.begin(write=True) as txn:
            put = txn.put
            for k, v in puts:
                put(k, v)

    def delete_range(self, lo: bytes, hi: bytes) -> int:
        n = 0
        with self.env.begin(write=True) as txn:
            cur = txn.cursor()
            if cur.set_range(lo):
                while cur.key() < hi and cur.delete():
                    n += 1
        return n

    def first_key(self, lo: bytes, hi: bytes) -> bytes | None:
        with self.env.begin() as txn:
            cur = txn.cursor()
            if cur.set_range(lo) and cur.key() < hi:
                return cur.key()
        return None

    def scan(self, lo: bytes, hi: bytes) -> int:
        n = 0
        with self.env.begin() as txn:
            cur = txn.cursor()
            if cur.set_range(lo):
                for k, _v in cur.iternext():
                    if k >= hi:
                        break
                    n += 1
        return n

    def get_many(self, keys: list[bytes]) -> int:
        hits = 0
        with self.env.begin() as txn:
            get = txn.get
            for k in keys:
                if get(k) is not None:
                    hits += 1
        return hits

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.env.close()


class RocksEngine:
    name = "rocksdb"

    def __init__(self, path: str, sync: bool, map_size: int) -> None:
        import rocksdict

        from raftkv.rocksstore import options

        self._r = rocksdict
        self.db = rocksdict.Rdict(path, options())  # raftkv's own settings (raftkv/rocksstore.py)
        self.wo = rocksdict.WriteOptions()
        self.wo.sync = sync

    def commit(self, puts: Iterable[tuple[bytes, bytes]]) -> None:
        wb = self._r.WriteBatch(raw_mode=True)
        put = wb.put
        for k, v in puts:
            put(k, v)
        self.db.write(wb, self.wo)

    def delete_range(self, lo: bytes, hi: bytes) -> int:
        wb = self._r.WriteBatch(raw_mode=True)
        wb.delete_range(lo, hi)
        self.db.write(wb, self.wo)
        return -1  # a range tombstone: RocksDB does not count what it covers

    def _bounded(self, hi: bytes):
        ro = self._r.ReadOptions()
        ro.set_iterate_upper_bound(hi)
        return ro

    def first_key(self, lo: bytes, hi: bytes) -> bytes | None:
        for k in self.db.keys(from_key=lo, read_opt=self._bounded(hi)):
            return k
        return None

    def scan(self, lo: bytes, hi: bytes) -> int:
        n = 0
        for _k, _v in self.db.items(from_key=lo, read_opt=self._bounded(hi)):
            n += 1
        return n

    def get_many(self, keys: list[bytes]) -> int:
        hits = 0
        get = self.db.get
        for k in keys:
            if get(k) is not None:
                hits += 1
        return hits

    def flush(self) -> None:
        self.db.flush()

    def close(self) -> None:
        self.db.close()


def engine_available(name: str) -> bool:
    try:
        __import__("rocksdict" if name == "rocksdb" else "lmdb")
    except ImportError:
        return False
    return True


def open_engine(name: str, path: str, sync: bool, map_size: int):
    if name == "rocksdb":
        return RocksEngine(path, sync, map_size)
    return LMDBEngine(path, sync, map_size, metasync=name != "lmdb-nometasync")


# --------------------------------------------------------------------------- measurements


def quantile(sorted_xs: list[float], q: float) -> float:
    if not sorted_xs:
        return float("nan")
    return sorted_xs[min(len(sorted_xs) - 1, int(q * len(sorted_xs)))]


def disk_bytes(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def rss() -> tuple[int, int]:
    """(VmRSS, RssAnon) of this process in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "RssAnon:")):
                k, v, _unit = line.split()
                out[k[:-1]] = int(v) * 1024
    return out.get("VmRSS", 0), out.get("RssAnon", 0)


def write_bytes() -> int:
    """Bytes this process (all its threads) sent to the block layer so far, 0 where /proc/self/io is missing."""
    try:
        with open("/proc/self/io") as f:
            return next((int(ln.split()[1]) for ln in f if ln.startswith("write_bytes:")), 0)
    except OSError:
        return 0


def job_group_commit(eng, a, groups: int) -> dict:
    rng = random.Random(groups)
    next_index = [1] * groups
    term, vote = 7, 1
    lat: list[float] = []
    entries = 0
    t_end = time.perf_counter() + a.duration
    start = time.perf_counter()
    written = write_bytes()
    while True:
        t0 = time.perf_counter()
        if t0 >= t_end and lat:
            break
        puts = []
        for g in range(groups):
            n = rng.randint(1, 4)
            i0 = next_index[g]
            for i in range(i0, i0 + n):
                puts.append((log_key(g, i), payload(i, 200)))
            next_index[g] = i0 + n
            puts.append((_GROUPKEY.pack(b"H", g), _HARD.pack(term, vote, max(0, i0 - 1))))
            entries += n
        eng.commit(puts)
        lat.append(time.perf_counter() - t0)
    wall = time.perf_counter() - start
    written = write_bytes() - written
    lat.sort()
    return {
        f"group_commit_G{groups}_ticks_per_s": len(lat) / wall,
        f"group_commit_G{groups}_entries_per_s": entries / wall,
        f"group_commit_G{groups}_p50_ms": quantile(lat, 0.50) * 1e3,
        f"group_commit_G{groups}_p99_ms": quantile(lat, 0.99) * 1e3,
        f"group_commit_G{groups}_disk_bytes_per_entry": written / max(1, entries),
    }


def job_tick(eng, a, groups: int) -> dict:
    """A node's driver-loop commit: 24 client writes spread over ``groups`` groups, each as a 200 B log entry,
    a 100 B data key at a random place, a 30 B session record at a random place, plus every touched group's
    hard state and applied index, in ONE durable commit."""
    rng = random.Random(groups)
    next_index = [1] * groups
    lat: list[float] = []
    t_end = time.perf_counter() + a.duration
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        if t0 >= t_end and lat:
            break
        puts = []
        touched = set()
        for _ in range(24):
            g = rng.randrange(groups)
            touched.add(g)
            i = next_index[g]
            next_index[g] = i + 1
            puts.append((log_key(g, i), payload(i, 200)))
            puts.append((data_key(g, rng.randrange(1 << 30)), payload(i, 100)))
            puts.append((_GROUPKEY.pack(b"S", g) + rng.randbytes(8), payload(i, 30)))
        for g in touched:
            puts.append((_GROUPKEY.pack(b"H", g), _HARD.pack(7, 1, next_index[g] - 1)))
            puts.append((_GROUPKEY.pack(b"A", g), (next_index[g] - 1).to_bytes(8, "big")))
        eng.commit(puts)
        lat.append(time.perf_counter() - t0)
    wall = time.perf_counter() - start
    lat.sort()
    return {
        f"tick_G{groups}_per_s": len(lat) / wall,
        f"tick_G{groups}_p50_ms": quantile(lat, 0.50) * 1e3,
        f"tick_G{groups}_p99_ms": quantile(lat, 0.99) * 1e3,
    }


def job_apply(eng, a, sync: bool) -> dict:
    rng = random.Random(5)
    applied = 0
    keys = 0
    start = time.perf_counter()
    t_end = start + a.duration
    while True:
        if time.perf_counter() >= t_end and keys:
            break
        applied += 1
        puts = [(data_key(rng.randrange(a.shards), rng.randrange(1 << 30)), payload(applied * 100 + j, 100))
                for j in range(100)]
        puts.append((_GROUPKEY.pack(b"A", 0), _U64.pack(applied)))
        eng.commit(puts)
        keys += 100
    wall = time.perf_counter() - start
    return {f"apply_{'sync' if sync else 'nosync'}_keys_per_s": keys / wall}


def job_prefix_delete(eng, a) -> dict:
    n = a.log_entries
    for lo in range(1, n + 1, a.batch):
        eng.commit((log_key(0, i), payload(i, 200)) for i in range(lo, min(n, lo + a.batch - 1) + 1))
    half = n // 2
    t0 = time.perf_counter()
    deleted = eng.delete_range(log_key(0, 1), log_key(0, half + 1))
    t1 = time.perf_counter()
    first = eng.first_key(log_key(0, 0), log_key(1, 0))
    t2 = time.perf_counter()
    assert deleted in (-1, half), deleted
    assert first == log_key(0, half + 1), first
    return {"prefix_delete_ms": (t1 - t0) * 1e3, "prefix_delete_next_seek_ms": (t2 - t1) * 1e3}


def job_dataset(eng, a, path: str) -> dict:
    per_shard = a.keys // a.shards
    base_rss, base_anon = rss()

    def keys_in_order():
        i = 0
        for s in range(a.shards):
            for j in range(per_shard):
                i += 1
                yield data_key(s, j), payload(i, 100)

    it = keys_in_order()
    total = per_shard * a.shards
    t0 = time.perf_counter()
    done = 0
    while done < total:
        batch = [next(it) for _ in range(min(a.batch, total - done))]
        eng.commit(batch)
        done += len(batch)
    load_s = time.perf_counter() - t0
    eng.flush()
    load_rss, load_anon = rss()
    size = disk_bytes(path)

    rng = random.Random(3)
    reads = 0
    t0 = time.perf_counter()
    t_end = t0 + a.duration
    while time.perf_counter() < t_end or not reads:
        chunk = [data_key(rng.randrange(a.shards), rng.randrange(per_shard)) for _ in range(1000)]
        hits = eng.get_many(chunk)
        assert hits == len(chunk), (hits, len(chunk))
        reads += len(chunk)
    reads_s = time.perf_counter() - t0

    shard = min(3, a.shards - 1)
    t0 = time.perf_counter()
    n = eng.scan(_U32.pack(shard), _U32.pack(shard + 1))
    scan_s = time.perf_counter() - t0
    assert n == per_shard, (n, per_shard)
    reads_rss, reads_anon = rss()
    return {
        "bulk_load_keys_per_s": total / load_s,
        "bulk_load_disk_mb": size / 1e6,
        "bulk_load_rss_mb": load_rss / 1e6,
        "bulk_load_rss_anon_mb": load_anon / 1e6,
        "bulk_load_rss_before_mb": base_rss / 1e6,
        "point_reads_per_s": reads / reads_s,
        "scan_keys_per_s": n / scan_s,
        "after_reads_rss_mb": reads_rss / 1e6,
        "after_reads_rss_anon_mb": reads_anon / 1e6,
    }


def _child(conn, engine: str, kind: str, arg, a, path: str) -> None:
    try:
        sync = not (kind == "apply" and not arg)
        eng = open_engine(engine, path, sync, a.map_size)
        try:
            if kind == "group_commit":
                out = job_group_commit(eng, a, arg)
            elif kind == "tick":
                out = job_tick(eng, a, arg)
            elif kind == "apply":
                out = job_apply(eng, a, arg)
            elif kind == "prefix_delete":
                out = job_prefix_delete(eng, a)
            else:
                out = job_dataset(eng, a, path)
        finally:
            eng.close()
        out["_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6
        conn.send(("ok", out))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


def run_job(engine: str, kind: str, arg, a) -> dict:
    """One measurement in a child process of its own, on a fresh directory removed afterwards.

    Spawned, not forked: a parent that has opened a RocksDB store (raftkv's default engine) runs RocksDB's
    background threads, and a forked child can inherit a lock one of them held and wait on it forever."""
    path = tempfile.mkdtemp(prefix=f".engine-bench-{engine}-", dir=a.dir)
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)  # the spawned child imports this module by name
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(child, engine, kind, arg, a, path))
    try:
        p.start()
        child.close()
        status, out = parent.recv()
        p.join()
    finally:
        if p.is_alive():
            p.kill()
            p.join()
        shutil.rmtree(path, ignore_errors=True)
    if status != "ok":
        raise RuntimeError(f"{engine} {kind} {arg}: {out}")
    return out


# --------------------------------------------------------------------------- driver


def machine() -> dict:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
            "python": platform.python_version(), "loadavg_start": os.getloadavg()[0]}


def fsync_probe(d: str, n: int = 200) -> dict:
    """Per-append latency of a 200-byte write + fdatasync: the floor for any durable commit here."""
    fd, p = tempfile.mkstemp(prefix=".engine-bench-fsync-", dir=d)
    lat = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            os.write(fd, _RANDOM[:200])
            os.fdatasync(fd)
            lat.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
        os.unlink(p)
    lat.sort()
    return {"fdatasync_200B_p50_ms": quantile(lat, 0.5) * 1e3, "fdatasync_200B_p99_ms": quantile(lat, 0.99) * 1e3}


def versions() -> dict:
    out = {}
    try:
        import lmdb

        out["lmdb"] = lmdb.__version__
        out["liblmdb"] = ".".join(map(str, lmdb.version()))
    except ImportError:
        pass
    try:
        from importlib.metadata import version

        out["rocksdict"] = version("rocksdict")
    except Exception:  # noqa: BLE001 - not installed
        pass
    return out


def plan(a) -> list[tuple[str, object]]:
    jobs: list[tuple[str, object]] = [("group_commit", g) for g in a.groups]
    jobs += [("tick", g) for g in a.groups]
    jobs += [("apply", True), ("apply", False), ("prefix_delete", None), ("dataset", None)]
    return [(kind, arg) for kind, arg in jobs if kind in a.workloads]


UNITS = {"per_s": "/s", "_ms": "ms", "_mb": "MB", "bytes_per_entry": "B"}


def unit(metric: str) -> str:
    return next((u for suffix, u in UNITS.items() if metric.endswith(suffix)), "")


def summarize(runs: dict[str, dict[str, list[float]]]) -> dict:
    out: dict = {}
    for engine, metrics in runs.items():
        out[engine] = {}
        for m, xs in metrics.items():
            out[engine][m] = {"unit": unit(m), "runs": [round(x, 4) for x in xs], "min": round(min(xs), 4),
                              "median": round(statistics.median(xs), 4), "max": round(max(xs), 4)}
    return out


def fmt(x: float) -> str:
    if x >= 1000:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.3f}"


def table(summary: dict) -> str:
    engines = list(summary)
    metrics: list[str] = []
    for e in engines:
        metrics += [m for m in summary[e] if m not in metrics and not m.startswith("_")]
    head = "| metric | unit | " + " | ".join(f"{e} median (min-max)" for e in engines) + " |"
    lines = [head, "|" + "---|" * (2 + len(engines))]
    for m in metrics:
        cells = []
        for e in engines:
            s = summary[e].get(m)
            cells.append(f"{fmt(s['median'])} ({fmt(s['min'])}-{fmt(s['max'])})" if s else "-")
        lines.append(f"| {m} | {unit(m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comma_ints(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError("a comma list of integers") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=3.0,
                    help="seconds per timed workload (group commit, apply, point reads); default 3")
    ap.add_argument("--dir", default=REPO,
                    help="parent of the fresh per-run directories (same filesystem as the data); default: repo root")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    ap.add_argument("--engines", default=",".join(ENGINES),
                    help=f"comma list of {', '.join(ENGINES + VARIANTS)}; default {','.join(ENGINES)}")
    ap.add_argument("--workloads", default=",".join(WORKLOADS),
                    help=f"comma list of {', '.join(WORKLOADS)} (dataset: bulk load, point reads, scan); default all")
    ap.add_argument("--reps", type=int, default=3, help="repetitions (min/median/max over them); default 3")
    ap.add_argument("--groups", type=comma_ints, default=[1, 6, 64], help="Raft groups per tick; default 1,6,64")
    ap.add_argument("--keys", type=int, default=1_000_000, help="keys for bulk load, reads, scan; default 1M")
    ap.add_argument("--shards", type=int, default=8, help="shards the keys are spread over; default 8")
    ap.add_argument("--batch", type=int, default=10_000, help="keys per bulk-load commit; default 10000")
    ap.add_argument("--log-entries", type=int, default=100_000,
                    help="log entries before the prefix delete (half are deleted); default 100000")
    ap.add_argument("--map-size", type=int, default=4 << 30, help="LMDB map size in bytes; default 4 GiB")
    a = ap.parse_args(argv)
    a.engines = [e.strip() for e in a.engines.split(",") if e.strip()]
    a.workloads = [w.strip() for w in a.workloads.split(",") if w.strip()]
    bad = [e for e in a.engines if e not in ENGINES + VARIANTS] + [w for w in a.workloads if w not in WORKLOADS]
    if bad:
        ap.error(f"unknown engine(s) or workload(s): {', '.join(bad)}")
    if a.keys < a.shards or a.shards < 1 or a.reps < 1 or a.duration <= 0:
        ap.error("need --keys >= --shards >= 1, --reps >= 1, --duration > 0")
    return a


def main(argv: list[str] | None = None, out: Callable[[str], None] = print) -> dict:
    a = parse_args(argv)
    os.makedirs(a.dir, exist_ok=True)
    engines = [e for e in a.engines if engine_available(e)]
    skipped = [e for e in a.engines if e not in engines]
    for e in skipped:
        out(f"skipping {e}: its Python package is not installed (pip install -e '.[bench]')")
    doc: dict = {
        "generator": "bench/engine_bench.py",
        "command": " ".join(["bench/engine_bench.py", *(sys.argv[1:] if argv is None else argv)]),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {**machine(), **fsync_probe(a.dir)},
        "versions": versions(),
        "params": {"workloads": a.workloads, "duration_s": a.duration, "reps": a.reps, "groups": a.groups, "keys": a.keys,
                   "shards": a.shards, "batch": a.batch, "log_entries": a.log_entries, "map_size": a.map_size,
                   "entry_bytes": 200, "value_bytes": 100, "entries_per_group_per_tick": "1-4"},
        "engines_skipped": skipped,
    }
    runs: dict[str, dict[str, list[float]]] = {e: {} for e in engines}
    for rep in range(a.reps):
        for kind, arg in plan(a):
            for e in engines:
                t0 = time.perf_counter()
                res = run_job(e, kind, arg, a)
                for m, v in res.items():
                    runs[e].setdefault(m if m != "_maxrss_mb" else f"_maxrss_mb_{kind}", []).append(v)
                out(f"rep {rep + 1}/{a.reps} {e:8s} {kind}{'' if arg is None else f' {arg}'}: "
                    f"{time.perf_counter() - t0:.1f} s, load {os.getloadavg()[0]:.2f}")
    doc["machine"]["loadavg_end"] = os.getloadavg()[0]
    doc["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    doc["results"] = summarize(runs)
    out("")
    out(table(doc["results"]))
    m = doc["machine"]
    out(f"\n{m['nproc']} CPUs ({m['cpu']}), load {m['loadavg_start']:.2f} -> {m['loadavg_end']:.2f}; "
        f"fdatasync of a 200 B append: p50 {m['fdatasync_200B_p50_ms']:.2f} ms, p99 {m['fdatasync_200B_p99_ms']:.2f} ms")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
    return doc


if __name__ == "__main__":
    main()
