"""The failover benchmark: kill -9 a leader under put load, time from the kill to the first successful write.

raftkv: the leader of shard ``t mod shards`` is killed on trial ``t``; a probe retries one session write to
that shard through the surviving nodes.  etcd (when on PATH): its leader is killed and a put is retried on
the surviving members, with short attempts (see ``_probe_write_etcd``).  Redis is not replicated, so it has
no failover to measure.
"""

from __future__ import annotations

import shutil
import signal
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raftkv import protocol
from raftkv.bench.etcd_http import b64, http_call
from raftkv.bench.load import LoadParams, LoadRun
from raftkv.bench.preload import preload
from raftkv.bench.report import machine
from raftkv.bench.suite import say
from raftkv.bench.systems import FAILOVER_PEERS, EtcdSystem, RaftKVSystem, System, found_peers
from raftkv.cluster import LocalCluster, key_on_shard


def _probe_write_raftkv(lc: LocalCluster, shard: int, exclude: str, deadline: float) -> tuple[float | None, int]:
    """Retry a session write to ``shard`` via the surviving nodes until it succeeds; (success time, attempts)."""
    key = key_on_shard(lc.map, shard)
    sid = f"probe-{uuid.uuid4().hex[:8]}".encode()
    survivors = [n for n in lc.map.nodes if n != exclude]
    attempts = 0
    while time.perf_counter() < deadline:
        node = survivors[attempts % len(survivors)]
        attempts += 1
        try:
            rep = lc.call(node, "RAFTKV.REQ", sid, "1", "SET", key, b"x", timeout=2.0)
        except OSError:
            continue
        if not isinstance(rep, protocol.ReplyError):
            return time.perf_counter(), attempts
    return None, attempts


def _probe_write_etcd(es: EtcdSystem, exclude: str, deadline: float) -> tuple[float | None, int]:
    """Retry a put on the surviving etcd members until one succeeds; (success time, attempts)."""
    survivors = [n for n in es.names if n != exclude]
    attempts = 0
    while time.perf_counter() < deadline:
        n = survivors[attempts % len(survivors)]
        attempts += 1
        try:
            # Short attempts: a member without a leader holds a proposal until its own request timeout,
            # so a long attempt would measure our timeout, not the election.
            st, _ = http_call(es.addr(n), "/v3/kv/put", {"key": b64(b"__failover_probe"), "value": b64(b"x")},
                              timeout=0.2)
        except OSError:
            continue
        if st == 200:
            return time.perf_counter(), attempts
    return None, attempts


def run_failover(trials: int = 5, systems: tuple[str, ...] = ("raftkv", "etcd"), shards: int = 3,
                 load_clients: int = 8, settle: float = 5.0, keyspace: int = 10_000, out: Callable[[str], None] = say,
                 workdir: str | None = None) -> dict:
    """kill -9 the leader of a shard under put load ``trials`` times; time from the kill to the first write."""
    wanted = [s for s in systems if s != "raftkv"]
    peers, skipped = found_peers([s for s in wanted if s in FAILOVER_PEERS])
    # Anything else (Redis) would otherwise be started as if it were etcd.
    skipped.update({s: "no failover to measure (failover peers: " + ", ".join(FAILOVER_PEERS) + ")"
                    for s in wanted if s not in FAILOVER_PEERS})
    doc: dict[str, Any] = {"machine": machine(), "trials": trials, "load_clients": load_clients, "settle_s": settle,
                           "peers_found": peers, "peers_skipped": skipped, "systems": {}}
    base = Path(workdir or tempfile.mkdtemp(prefix="raftkv-failover-"))
    out(f"failover: {trials} trials per system, put load from {load_clients} clients, {settle:g} s settle "
        f"before each kill; peers found {peers or 'none'}, skipped {skipped or 'none'}")
    for sname in [s for s in systems if s == "raftkv" or s in peers]:  # raftkv first, when asked for
        d = base / sname
        d.mkdir(parents=True, exist_ok=True)
        sysobj: System = RaftKVSystem(str(d), shards=shards) if sname == "raftkv" else EtcdSystem(str(d))
        times: list[float] = []
        lost = 0
        try:
            preload(sysobj, keyspace)
            p = LoadParams("put", load_clients, duration=3600, warmup=0.5, keyspace=keyspace, op_timeout=10)
            run = LoadRun(sysobj, p).start()
            time.sleep(1.0)
            for t in range(trials):
                time.sleep(settle)
                if isinstance(sysobj, RaftKVSystem):
                    lc = sysobj.lc
                    shard = t % lc.map.nshards
                    victim = lc.leader_of(shard)
                    if victim is None:
                        out(f"   trial {t + 1}: shard {shard} has no leader before the kill; skipped")
                        continue
                    t0 = time.perf_counter()
                    lc.signal_node(victim, signal.SIGKILL)
                    ok_at, attempts = _probe_write_raftkv(lc, shard, victim, t0 + 30)
                    lc._reap(victim, 5.0)
                    lc.start_node(victim)
                    lc.wait_ready(60)
                    what = f"shard {shard} leader {victim}"
                else:
                    es = sysobj  # type: ignore[assignment]
                    victim = es.leader()
                    if victim is None:
                        out(f"   trial {t + 1}: no etcd leader before the kill; skipped")
                        continue
                    t0 = time.perf_counter()
                    es.procs[victim].send_signal(signal.SIGKILL)
                    ok_at, attempts = _probe_write_etcd(es, victim, t0 + 30)
                    es.procs[victim].wait()
                    es.start_member(victim)
                    es.wait_ready(60)
                    what = f"leader {victim}"
                if ok_at is None:
                    lost += 1
                    out(f"   trial {t + 1}: {sname} {what}: no successful write within 30 s")
                    continue
                times.append(ok_at - t0)
                out(f"   trial {t + 1}: {sname} killed {what}: first write after {ok_at - t0:.3f} s "
                    f"({attempts} probe attempt(s))")
            run.stop()
            res = run.finish()
        finally:
            sysobj.stop()
        entry = {"times_s": [round(x, 3) for x in times], "no_write_within_30s": lost,
                 "median_s": round(statistics.median(times), 3) if times else None,
                 "worst_s": round(max(times), 3) if times else None,
                 "load": res.row(), "description": sysobj.description()}
        doc["systems"][sname] = entry
        out(f"== {sname}: failover median {entry['median_s']} s, worst {entry['worst_s']} s over {len(times)} kills; "
            f"load: {res.ops} ops, errors {res.errors} {res.error_codes}, indeterminate {res.indeterminate}")
    if workdir is None:
        shutil.rmtree(base, ignore_errors=True)
    return doc
