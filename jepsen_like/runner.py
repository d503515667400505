"""``raftkv-jepsen run``: one fault-injection run, end to end.

Theory of operation
===================

1. *Namespace.*  Unless ``--netns off``, the harness first checks that it can
   build a private network namespace with working iptables
   (:func:`jepsen_like.netns.probe`) and re-executes itself inside one; the
   outer process only waits for the inner one and returns its exit code.
   Without a namespace the run still happens on ``127.0.0.1`` with every
   nemesis except ``partition`` (``--nemesis all`` drops it and says so;
   ``--nemesis partition`` exits 3, "unavailable").
2. *Cluster.*  A fresh cluster (``--nodes`` x ``--shards``) in
   ``store/<workload>-<timestamp>/nodes/``: node *i* on ``127.0.0.i`` inside
   the namespace, all on ``127.0.0.1`` outside; ``--unsafe-local-reads``
   passes the flag of the same name to every node.
3. *Load.*  ``--clients`` threads, each with its own ``raftkv.Client``,
   closed-loop (``--rate 0``) or open-loop at ``--rate`` ops/s in total
   (Poisson arrivals per client).  Every invocation and completion is
   recorded with ``time.monotonic()`` relative to the start.  After an
   ``info`` (indeterminate) op the thread continues as a new process id
   (``p + clients``), as in Jepsen: the old op may still take effect.
4. *Faults.*  A nemesis thread runs a seeded schedule (:mod:`jepsen_like.nemesis`).
5. *End.*  Clients stop after ``--time`` s; every fault is healed; the run
   waits (at most ``--recovery`` s) until every shard has a leader that
   serves reads; then one final read of every key used, recorded in the
   history (process ``final``): a lost acknowledged write shows up there.
6. *Checks and report.*  The workload's checks plus ``recovered`` (every shard
   served reads after the heal) and ``final-reads`` (every final read
   succeeded); :mod:`jepsen_like.report` writes results.json, plots, the
   timeline on a violation, and the summary.  Exit 0 only if every check
   passed, 1 if one failed, 2 if a check was inconclusive or the harness
   failed, 3 if the workload or nemesis is unavailable here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from jepsen_like import elections, netns, power
from jepsen_like import replicas as replicas_check
from jepsen_like.history import Event, ops_from_events
from jepsen_like.nemesis import Nemesis, make_schedule, moves_left, parse_nemesis
from jepsen_like.report import availability_windows, check_to_dict, op_counts, verdict_of, write_report
from jepsen_like.workloads import (
    CLIENT_AUTH,
    KEY_PREFIXES,
    WorkloadUnavailable,
    default_op_timeout,
    make_workload,
)

__all__ = ["RunConfig", "run", "EXIT_PASS", "EXIT_FAIL", "EXIT_UNKNOWN", "EXIT_UNAVAILABLE"]

EXIT_PASS, EXIT_FAIL, EXIT_UNKNOWN, EXIT_UNAVAILABLE = 0, 1, 2, 3


@dataclass
class RunConfig:
    workload: str = "register"
    nemesis: str = "none"
    time: float = 60.0
    clients: int = 10
    rate: float = 100.0
    nodes: int = 3
    shards: int = 3
    seed: int | None = None
    store: str = "store"
    unsafe_local_reads: bool = False
    read_any_node: bool = True
    read_routing: str = "own"
    attempt_timeout: float = 1.0  # register/set: seconds one attempt may wait (0: the whole op timeout)
    op_timeout: float | None = None  # None: the workload's default (workloads.default_op_timeout)
    recovery: float = 30.0
    keys_per_shard: int = 2
    key_period: float = 5.0
    check_timeout: float = 120.0
    netns: str = "auto"
    keep_data: bool = False
    fault_min: float = 2.0
    fault_max: float = 4.0
    quiet_min: float = 2.0
    quiet_max: float = 4.0
    partition_shapes: str = "halves,isolate-leader,majority-ring"
    auth: bool = False
    unsafe_lock_lapse: bool = False
    unsafe_skip_locks: bool = False  # negative control: every node with `raftkv serve --unsafe-skip-locks`
    unsafe_watch_miss: bool = False  # negative control: every node with `raftkv serve --unsafe-watch-miss`
    compact_every: int | None = None
    ttl_ops: float = 0.0
    edn_out: str | None = None
    disk_mib: int = 32
    unsafe_no_sync: bool = False

    def to_argv(self) -> list[str]:
        """Command-line options reproducing this config (for the re-exec inside the namespace)."""
        out = []
        for f in fields(self):
            v = getattr(self, f.name)
            opt = "--" + f.name.replace("_", "-")
            if isinstance(v, bool):
                if v != f.default:  # flags on by default are turned off with --no-NAME
                    out.append(opt if v else "--no-" + opt[2:])
            elif v is not None:
                out += [opt, str(v)]
        return out


class Recorder:
    """The history: events with times on one monotonic clock; thread-safe; closable."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.events: list[Event] = []
        self._lock = threading.Lock()
        self.closed = False

    def now(self) -> float:
        return time.monotonic() - self.t0

    def add(self, process: Any, type_: str, f: str, key: Any, value: Any) -> None:
        with self._lock:
            if not self.closed:
                self.events.append(Event(process, type_, f, key, value, round(self.now(), 6)))

    def close(self) -> list[Event]:
        with self._lock:
            self.closed = True
            return list(self.events)


def _say(msg: str) -> None:
    print(msg, flush=True)


def run(cfg: RunConfig) -> int:
    """Run once; returns the exit code (see the module docstring)."""
    if cfg.seed is None:
        cfg.seed = random.SystemRandom().randrange(1 << 31)
    if cfg.op_timeout is None:
        cfg.op_timeout = default_op_timeout(cfg.workload)
    if cfg.edn_out:
        cfg.edn_out = str(Path(cfg.edn_out).resolve())
    note = ""
    if cfg.netns != "off" and not netns.inside():
        avail = netns.probe()
        if avail.ok:
            return _reexec(avail, cfg)
        note = f"no private network namespace ({avail.reason}): partition nemesis skipped, all nodes on 127.0.0.1"
        if cfg.netns == "require" or _wants_partition(cfg):
            _say(f"raftkv-jepsen: partition nemesis unavailable: {avail.reason}")
            return EXIT_UNAVAILABLE
        _say(f"raftkv-jepsen: note: {note}")
    elif cfg.netns == "off" and _wants_partition(cfg):
        _say("raftkv-jepsen: partition nemesis needs the network namespace (--netns off given)")
        return EXIT_UNAVAILABLE
    return _run_here(cfg, note)


def _wants_partition(cfg: RunConfig) -> bool:
    """Partitions named explicitly (``all`` runs without them where no namespace can be made)."""
    return cfg.nemesis != "all" and "partition" in parse_nemesis(cfg.nemesis)


def _reexec(avail: netns.Availability, cfg: RunConfig) -> int:
    cmd, env = netns.reexec_command(avail, ["run", *cfg.to_argv()])
    p = subprocess.Popen(cmd, env=env)

    def forward(signum: int, _frame: Any) -> None:
        p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return p.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _run_dir(store: str, workload: str) -> Path:
    base = Path(store).resolve()
    stamp = datetime.now().strftime("%Y%m%dT%H%M%S")
    d = base / f"{workload}-{stamp}"
    i = 1
    while d.exists():
        i += 1
        d = base / f"{workload}-{stamp}-{i}"
    d.mkdir(parents=True)
    return d


OPERATOR_PASSWORD = "jepsen-operator"


def _restrict_clients(config: Path) -> None:
    """``--auth``: the clients log in as a user whose role may only read and write the workloads' keys."""
    from raftkv.client import Client

    with Client(cluster=config, password=OPERATOR_PASSWORD, timeout=30.0) as op:
        args = ["RAFTKV.ROLE", "SET", "jepsen-clients", "CATEGORIES", "read,write,txn",
                "READ", *KEY_PREFIXES, "WRITE", *KEY_PREFIXES]
        op.command(*args)
        op.command("RAFTKV.USER", "ADD", "jepsen", "jepsen-client", "jepsen-clients")
    CLIENT_AUTH.update(username="jepsen", password="jepsen-client")
    _wait_user_everywhere(config, "jepsen", "jepsen-client")
    _say("raftkv-jepsen: clients authenticate as 'jepsen', allowed keys " + ", ".join(p + "*" for p in KEY_PREFIXES))


def _wait_user_everywhere(config: Path, user: str, password: str, timeout_s: float = 30.0) -> None:
    """Until every node accepts ``user``'s AUTH: a node checks passwords against its own replica of the
    user table, so a follower that has not applied the new user yet would refuse the first clients."""
    from raftkv.cluster import call
    from raftkv.protocol import ReplyError
    from shards.shardmap import ShardMap

    deadline = time.monotonic() + timeout_s
    for name, info in ShardMap.load(config).nodes.items():
        while True:
            try:
                reply = call(info.client_addr, "PING", auth=[b"AUTH", user.encode(), password.encode()])
            except (OSError, ConnectionError) as e:
                reply = e
            if not isinstance(reply, ReplyError | OSError | ConnectionError):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} still refuses user {user!r} {timeout_s:g} s after it was added: {reply}")
            time.sleep(0.1)


def _run_here(cfg: RunConfig, note: str) -> int:
    from raftkv.cluster import LocalCluster, free_base_port
    from shards.shardmap import ShardMap, local_cluster

    inside = netns.inside()
    firewall = None
    if inside:
        netns.setup_inside()
        firewall = netns.Firewall()
        firewall.heal()
    kinds = parse_nemesis(cfg.nemesis)
    if firewall is None and "partition" in kinds:
        kinds.remove("partition")
    if "disk" in kinds and not inside:  # data dirs on a small tmpfs need the run's private mount namespace
        if cfg.nemesis != "all":
            _say("raftkv-jepsen: disk nemesis needs the harness's private namespace (a tmpfs per data dir)")
            return EXIT_UNAVAILABLE
        kinds.remove("disk")
    if "power" in kinds and power.shim_error():
        _say(f"raftkv-jepsen: power nemesis unavailable: {power.shim_error()}")
        if cfg.nemesis != "all":
            return EXIT_UNAVAILABLE
        kinds.remove("power")
    run_dir = _run_dir(cfg.store, cfg.workload)
    node_dir = run_dir / "nodes"
    base = 7001 if inside else free_base_port(cfg.nodes, cfg.shards)
    shardmap = local_cluster(cfg.nodes, cfg.shards, base_port=base, data_dir=str(node_dir / "data"),
                             per_node_hosts=inside)
    if cfg.auth:
        shardmap = dataclasses.replace(shardmap, security={"password": OPERATOR_PASSWORD})
    try:
        workload = make_workload(cfg.workload, shardmap, cfg.seed, keys_per_shard=cfg.keys_per_shard,
                                 key_period=cfg.key_period, op_timeout=cfg.op_timeout,
                                 read_any_node=cfg.read_any_node, read_routing=cfg.read_routing,
                                 attempt_timeout=cfg.attempt_timeout or None,
                                 unsafe_lock_lapse=cfg.unsafe_lock_lapse,
                                 ttl_ops=cfg.ttl_ops)
    except WorkloadUnavailable as e:
        _say(f"raftkv-jepsen: {e}")
        shutil.rmtree(run_dir, ignore_errors=True)
        return EXIT_UNAVAILABLE
    env = None
    if inside:
        shim = netns.write_bind_shim(run_dir / "nodes" / "shim")
        env = dict(os.environ)
        env["PYTHONPATH"] = str(shim) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env[netns.BIND_ENV] = ",".join(f"{n}={i.host}" for n, i in shardmap.nodes.items())
    node_args = ["--unsafe-local-reads"] if cfg.unsafe_local_reads else []
    node_args += ["--unsafe-skip-locks"] if cfg.unsafe_skip_locks else []
    node_args += ["--unsafe-watch-miss"] if cfg.unsafe_watch_miss else []
    if cfg.unsafe_no_sync:
        node_args.append("--unsafe-no-sync")
    power_log = None
    if "power" in kinds:  # every node loads the shim that logs its unsynced writes, for the power cut to undo
        power_log = node_dir / "power-undo"
        shim = power.build_shim(node_dir / "power-shim")
        env = dict(os.environ) if env is None else env
        env.update(power.shim_env(shim, root=node_dir / "data", log_dir=power_log))
    if cfg.compact_every:
        node_args += ["--compact-every", str(cfg.compact_every)]
    if {"clock", "clock-forward"} & set(kinds):  # nodes refuse RAFTKV.FAULT unless the point is armed
        node_args += ["--fault", "clock.skew_ms:0"]
    if "slow-disk" in kinds:
        node_args += ["--fault", "disk.slow_ms:0"]
    if "compaction" in kinds:  # RAFTKV.FAULT COMPACT.NOW forces checkpoints and log compactions
        node_args += ["--fault", "compact.now:0"]
    if "disk" in kinds:  # every node's data dir on a tmpfs of its own, which the disk nemesis fills
        for name in shardmap.nodes:
            netns.mount_tmpfs(shardmap.node_data_dir(name), cfg.disk_mib)
    cluster = LocalCluster(node_dir, shardmap, node_args=node_args, env=env)
    mode = ("private netns, node i on 127.0.0.i, iptables: " + os.environ.get(netns.ENV_MARK, "")) if inside \
        else "host loopback 127.0.0.1 (no partitions)"
    _say(f"raftkv-jepsen: {cfg.workload} / nemesis {cfg.nemesis} for {cfg.time:g} s, seed {cfg.seed}, "
         f"{cfg.nodes} nodes x {cfg.shards} shards{', UNSAFE local reads' if cfg.unsafe_local_reads else ''}"
         f"{', UNSAFE lock holders past their lease' if cfg.unsafe_lock_lapse else ''}"
         f"{', UNSAFE no fsync' if cfg.unsafe_no_sync else ''}"
         f"{', UNSAFE skip locks' if cfg.unsafe_skip_locks else ''}"
         f"{', UNSAFE watch miss' if cfg.unsafe_watch_miss else ''}; "
         f"{mode}; writing {run_dir}")
    rec = Recorder()
    rng = random.Random(cfg.seed)
    nemesis = Nemesis(cluster, random.Random(rng.random()), rec.now, firewall, log=_say,
                      shapes=tuple(x.strip() for x in cfg.partition_shapes.split(",") if x.strip()),
                      client_kw={"password": OPERATOR_PASSWORD} if cfg.auth else None, power_log=power_log)
    stop = threading.Event()
    threads: list[threading.Thread] = []
    results: dict[str, Any] = {}
    harness_error = ""
    recovered: dict[str, Any] = {"valid": False, "verdict": "not reached", "summary": "not reached"}
    final: dict[str, Any] = {"valid": False, "verdict": "not reached", "summary": "not reached"}
    replicas: dict[str, Any] = {"valid": False, "verdict": "not reached", "summary": "not reached (the cluster "
                                                                                     "did not recover)"}
    moves: dict[str, Any] = {"valid": False, "verdict": "not reached", "summary": "not reached (the cluster did "
                                                                               "not recover)"}
    schedule: list = []
    t_load_end = 0.0
    try:
        signal.signal(signal.SIGTERM, _raise_interrupt)
        cluster.start()
        _wait_started(cluster, timeout=90)
        if cfg.auth:
            _restrict_clients(cluster.config)
        rec.t0 = time.monotonic()
        workload.setup(rec)
        schedule = make_schedule(kinds, cfg.time, random.Random(rng.random()),
                                 fault=(cfg.fault_min, cfg.fault_max), quiet=(cfg.quiet_min, cfg.quiet_max))
        for p in range(cfg.clients):
            t = threading.Thread(target=_client_loop, name=f"client-{p}", daemon=True,
                                 args=(workload, rec, stop, p, cfg, random.Random(f"{cfg.seed}-{p}")))
            threads.append(t)
            t.start()
        nem_t = threading.Thread(target=nemesis.run, args=(schedule, stop), name="nemesis", daemon=True)
        nem_t.start()
        while rec.now() < cfg.time:
            time.sleep(min(0.2, cfg.time - rec.now() + 0.001))
        stop.set()
        t_load_end = rec.now()
        for t in threads:
            t.join(timeout=(cfg.op_timeout or 0) + 10)
        nem_t.join(timeout=30)
        healed = nemesis.heal_all()
        _say(f"raftkv-jepsen: load stopped at {t_load_end:.1f} s; healed ({', '.join(healed) or 'nothing to do'}); "
             "waiting for recovery")
        t_heal = rec.now()
        try:
            cluster.wait_ready(timeout=cfg.recovery)
            recovered = {"valid": True, "verdict": "ok",
                         "summary": f"every shard served reads {rec.now() - t_heal:.1f} s after the heal"}
        except Exception as e:  # noqa: BLE001
            recovered = {"valid": False, "verdict": "not recovered", "summary": str(e)}
            _write_not_recovered(cluster, run_dir / "not-recovered.json")
        final = _final_reads(workload, rec, cfg)
        if recovered["valid"]:  # every replica of a shard, at one revision, holds the same data
            # the cluster file as it is now: the reshard nemesis adds shards (a shard still being added included)
            now_map = ShardMap.load(cluster.config)
            shards = [*range(now_map.nshards), *([] if now_map.adding is None else [now_map.adding])]
            replicas = replicas_check.check(replicas_check.ask_node(cluster),
                                            {s: list(now_map.placement[s]) for s in shards},
                                            describe=replicas_check.describe_node(cluster),
                                            progress=replicas_check.progress_of(cluster))
            if "reshard" in kinds:
                moves = _moves_check(cluster)
    except KeyboardInterrupt:
        harness_error = "interrupted"
        stop.set()
    except Exception as e:  # noqa: BLE001 - reported, the cluster is still stopped below
        harness_error = f"{type(e).__name__}: {e}"
        traceback.print_exc()
        stop.set()
    finally:
        events = rec.close()
        try:
            nemesis.heal_all()
        except Exception:  # noqa: BLE001
            pass
        cluster.stop()
        if not cfg.keep_data:
            shutil.rmtree(node_dir / "data", ignore_errors=True)
    duration = rec.now()
    _write_history(run_dir / "history.jsonl", events)
    ops = ops_from_events(events)
    info_done = _info_done(events)
    checks_raw = {}
    checks: dict[str, dict[str, Any]] = {}
    if not harness_error:
        _say(f"raftkv-jepsen: checking {len(ops)} ops")
        checks_raw = workload.check(ops, cfg.check_timeout)
        checks = {name: check_to_dict(r) for name, r in checks_raw.items()}
        checks["recovered"] = recovered
        checks["final-reads"] = final
        checks["replicas"] = replicas
        if "reshard" in kinds:  # the heal finished every shard add: no move is left half-done anywhere
            checks["shard-moves"] = moves
        checks["elections"] = elections.judge(
            elections.elected({n: list(_log_lines(cluster.log_file(n))) for n in shardmap.nodes}))
    else:
        checks["harness"] = {"valid": None, "verdict": "unknown", "summary": f"harness error: {harness_error}"}
    faults = [f.to_dict() for f in nemesis.faults]
    results.update({
        "workload": cfg.workload,
        "dir": str(run_dir),
        "verdict": verdict_of(checks),
        "duration_s": round(duration, 3),
        "load_end_s": round(t_load_end, 3),
        "config": asdict(cfg) | {"nemesis_kinds": kinds},
        "network": {"mode": mode, "note": note,
                    "node_hosts": {n: i.host for n, i in shardmap.nodes.items()}},
        "counts": op_counts(ops),
        "checks": checks,
        "schedule": [{"start": s, "kind": k, "length": n} for s, k, n in schedule],
        "faults": faults,
        "availability": availability_windows([op for op in ops if op.client != "final"], faults, t_load_end),
        "harness_error": harness_error,
        "command": "raftkv-jepsen run " + " ".join(cfg.to_argv()),
    })
    if cfg.edn_out:
        results["edn_files"] = _export_edn(ops, cfg)
    text = write_report(run_dir, results, ops, checks_raw, info_done)
    _say(text)
    return {"pass": EXIT_PASS, "fail": EXIT_FAIL}.get(results["verdict"], EXIT_UNKNOWN)


def _log_lines(path: Path) -> list[str]:
    """A node's log (every start of the node appends to it), or nothing if it never started."""
    try:
        return path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []


def _export_edn(ops: list, cfg: RunConfig) -> list[str]:
    """``--edn-out``: the history as Knossos EDN files (one per object); a workload Knossos has no model
    for is reported, not an error of the run."""
    from jepsen_like.knossos import export_history

    try:
        files = export_history(ops, cfg.workload, cfg.edn_out or ".")
    except ValueError as e:
        _say(f"raftkv-jepsen: no EDN export: {e}")
        return []
    _say(f"raftkv-jepsen: wrote {len(files)} Knossos EDN histor{'y' if len(files) == 1 else 'ies'} to {cfg.edn_out}")
    return [str(f) for f in files]


def _moves_check(cluster: Any, timeout: float = 20.0) -> dict[str, Any]:
    """The ``shard-moves`` check (reshard runs): no ``shard add`` left half-done, in the cluster file or on any
    replica (``nemesis.moves_left``); asked again until it holds or ``timeout`` s passed (a follower may still
    be applying the end of a move)."""
    from shards.shardmap import ShardMap

    deadline = time.monotonic() + timeout
    while True:
        m = ShardMap.load(cluster.config)
        statuses = {}
        for name in m.nodes:
            try:
                statuses[name] = json.loads(cluster.call(name, "RAFTKV.STATUS", timeout=5.0))
            except Exception:  # noqa: BLE001 - a silent node is reported below if it stays silent
                pass
        left = moves_left(m, statuses)
        missing = sorted(set(m.nodes) - set(statuses))
        if not left and not missing:
            return {"valid": True, "verdict": "ok",
                    "summary": f"{m.nshards} shards on the ring (epoch {m.epoch}); no move left on any replica"}
        if time.monotonic() > deadline:
            if left:
                return {"valid": False, "verdict": "moves left", "summary": "; ".join(left)}
            return {"valid": None, "verdict": "unknown", "summary": f"no status from {', '.join(missing)}"}
        time.sleep(0.3)


def _write_not_recovered(cluster: Any, path: Path) -> None:
    """What each node says when the cluster did not recover: its status and a read of one key per shard
    through it (the failing check reads through the first node), for the report's reader."""
    from raftkv.cluster import key_on_shard

    out: dict[str, Any] = {}
    for name in cluster.map.nodes:
        entry: dict[str, Any] = {}
        try:
            entry["status"] = json.loads(cluster.call(name, "RAFTKV.STATUS", timeout=5.0))
        except Exception as e:  # noqa: BLE001 - what failed is the finding
            entry["status_error"] = f"{type(e).__name__}: {e}"
        reads = {}
        for s in range(cluster.map.nshards):
            try:
                reply = cluster.call(name, "GET", key_on_shard(cluster.map, s), timeout=5.0)
                reads[str(s)] = repr(reply)[:300]
            except Exception as e:  # noqa: BLE001
                reads[str(s)] = f"{type(e).__name__}: {e}"
        entry["reads"] = reads
        out[name] = entry
    path.write_text(json.dumps(out, indent=1, default=str))


def _wait_started(cluster: Any, timeout: float) -> None:
    """``wait_ready``, but give up at once when a node process has exited (e.g. a crash at start-up)."""
    from raftkv.cluster import ClusterError

    deadline = time.monotonic() + timeout
    while True:
        try:
            cluster.wait_ready(timeout=3)
            return
        except ClusterError:
            dead = [n for n in cluster.map.nodes if cluster.pid(n) is None]
            if dead:
                log = cluster.log_file(dead[0])
                tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
                raise ClusterError(f"node(s) {', '.join(dead)} exited at start-up; {log}: {tail}") from None
            if time.monotonic() > deadline:
                raise


def _raise_interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _client_loop(workload: Any, rec: Recorder, stop: threading.Event, p: int, cfg: RunConfig,
                 rng: random.Random) -> None:
    worker = workload.worker(p, rng)
    process = p
    per_client = cfg.rate / cfg.clients if cfg.rate > 0 else 0.0
    next_t = rec.now()
    try:
        while not stop.is_set():
            if per_client:
                next_t = max(next_t + rng.expovariate(per_client), rec.now() - 1.0)
                if stop.wait(max(0.0, next_t - rec.now())):
                    break
            f, key, value = worker.next_op(rec.now())
            rec.add(process, "invoke", f, key, value)
            typ, out = worker.invoke(f, key, value)
            rec.add(process, typ, f, key, out)
            if typ == "info":
                process += cfg.clients
    finally:
        worker.close()


def _final_reads(workload: Any, rec: Recorder, cfg: RunConfig) -> dict[str, Any]:
    """The workload's final reads (through the routing client), each retried until ``cfg.recovery`` s passed."""
    deadline = time.monotonic() + cfg.recovery
    todo = workload.final_ops()
    failed = []
    worker = workload.worker("final", random.Random(cfg.seed), final=True)
    try:
        for f, key, value in todo:
            while True:
                rec.add("final", "invoke", f, key, value)
                typ, out = worker.invoke(f, key, value)
                rec.add("final", typ, f, key, out)
                if typ != "ok" and time.monotonic() < deadline:
                    time.sleep(0.5)
                    continue
                if typ != "ok":
                    failed.append(key if key is not None else f)
                break
    finally:
        worker.close()
    ok = not failed
    return {"valid": ok, "verdict": "ok" if ok else "failed",
            "summary": f"{len(todo) - len(failed)}/{len(todo)} final reads succeeded after recovery"
                       + (f"; failed: {failed[:5]}" if failed else "")}


def _write_history(path: Path, events: list[Event]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for e in events:
            fh.write(json.dumps({"process": e.process, "type": e.type, "f": e.f, "key": e.key,
                                 "value": e.value, "time": e.time}) + "\n")


def _info_done(events: list[Event]) -> dict[int, float]:
    """Op index -> time the client gave up, for ``info`` ops (op index = rank of its invoke event)."""
    pending: dict[Any, int] = {}
    out = {}
    n = 0
    for e in events:
        if e.type == "invoke":
            pending[e.process] = n
            n += 1
        elif e.process in pending:
            i = pending.pop(e.process)
            if e.type == "info" and e.time is not None:
                out[i] = e.time
    return out


def main_argv(argv: list[str]) -> int:  # pragma: no cover - convenience for `python -m jepsen_like.runner`
    from jepsen_like.cli import main

    try:
        main(["run", *argv])
    except SystemExit as e:
        return int(e.code or 0)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main_argv(sys.argv[1:]))
