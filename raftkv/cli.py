"""The ``raftkv`` command line (click).

Commands that talk to a cluster find it through ``--cluster FILE``, the
``RAFTKV_CLUSTER`` environment variable, or ``./.raftkv/cluster.toml``.
Exit status: 0 success, 1 "not found"/false (``get`` of a missing key, a CAS
that did not swap), 2 an error (unavailable, unknown outcome, bad input).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from raftkv.bulk import parse_lines
from raftkv.client import Client, IndeterminateError, RaftKVError
from raftkv.cluster import DEFAULT_DIR, ClusterError, LocalCluster
from raftkv.heap import FREEZE_PERIOD_S
from raftkv.ops_cli import client_kw, cluster_path

cluster_option = click.option(
    "--cluster", "cluster_file", envvar="RAFTKV_CLUSTER", default=None, metavar="FILE",
    help="cluster file (default: $RAFTKV_CLUSTER or ./.raftkv/cluster.toml)")


def _client(cluster_file: str | None, timeout: float = 10.0) -> Client:
    return Client(cluster=cluster_path(cluster_file), timeout=timeout, **client_kw())


def _with_client(cluster_file: str | None, op: Callable[[Client], Any]) -> Any:
    """Run ``op`` on a client of the cluster; a raftkv error ends the command with its message."""
    with _client(cluster_file) as c:
        try:
            return op(c)
        except RaftKVError as e:
            _fail(e)


def _fail(e: Exception) -> None:
    kind = "outcome unknown" if isinstance(e, IndeterminateError) else "error"
    click.echo(f"raftkv: {kind}: {e}", err=True)
    sys.exit(2)


@click.group()
@click.version_option(package_name="raftkv")
@click.option("--password", envvar="RAFTKV_PASSWORD", default=None,
              help="client password (default: $RAFTKV_PASSWORD or [security] password in the cluster file)")
@click.option("--user", envvar="RAFTKV_USER", default=None, help="ACL-style user name for AUTH")
@click.option("--tls", is_flag=True, help="connect to nodes with TLS (self-signed certificates accepted)")
@click.pass_context
def main(ctx: click.Context, password: str | None, user: str | None, tls: bool) -> None:
    """raftkv: a sharded, Raft-replicated key-value store."""
    ctx.obj = {"password": password, "user": user, "tls": tls}


# -- cluster lifecycle -------------------------------------------------------------

@main.group()
def cluster() -> None:
    """Start and stop a local cluster (the embedded default)."""


@cluster.command("up")
@click.option("--dir", "directory", default=DEFAULT_DIR, show_default=True, help="cluster directory")
@click.option("--nodes", default=3, show_default=True, type=click.IntRange(1, 9))
@click.option("--shards", default=3, show_default=True, type=click.IntRange(1, 64))
@click.option("--base-port", default=None, type=int, help="first client port (default: 7001, or a free range)")
@click.option("--timeout", default=60.0, show_default=True, help="seconds to wait for every shard to have a leader")
def cluster_up(directory: str, nodes: int, shards: int, base_port: int | None, timeout: float) -> None:
    """Write DIR/cluster.toml, start the nodes in the background, wait until every shard has a leader."""
    config = Path(directory) / "cluster.toml"
    try:
        if config.exists():
            lc = LocalCluster(directory)
            click.echo(f"using existing {config} ({len(lc.map.nodes)} nodes, {lc.map.nshards} shards)")
        else:
            from raftkv.cluster import _port_free

            base = base_port or 7001
            if base_port is None and not all(_port_free("127.0.0.1", base + i) for i in range(nodes)):
                from raftkv.cluster import free_base_port

                base = free_base_port(nodes, shards)
            lc = LocalCluster.create(directory, nodes=nodes, shards=shards, base_port=base)
        lc.start()
        started = time.monotonic()
        lc.wait_ready(timeout)
    except ClusterError as e:
        raise click.ClickException(str(e)) from None
    for name, info in lc.map.nodes.items():
        click.echo(f"{name}: {info.host}:{info.client_port} pid {lc.pid(name)} log {lc.log_file(name)}")
    click.echo(f"cluster ready in {time.monotonic() - started:.1f} s: every shard has a leader "
               f"(cluster file {lc.config})")


@cluster.command("down")
@click.option("--dir", "directory", default=DEFAULT_DIR, show_default=True)
@click.option("--purge", is_flag=True, help="also delete the cluster directory (all data)")
def cluster_down(directory: str, purge: bool) -> None:
    """Stop the nodes started by 'cluster up'."""
    try:
        lc = LocalCluster(directory)
    except ClusterError as e:
        raise click.ClickException(str(e)) from None
    running = lc.running()
    lc.stop()
    click.echo(f"stopped {len(running)} node(s): {', '.join(running) or '-'}")
    if purge:
        import shutil

        shutil.rmtree(lc.dir)
        click.echo(f"deleted {lc.dir}")


@main.command()
@click.option("--config", required=True, type=click.Path(exists=True, dir_okay=False), help="cluster file")
@click.option("--node", "node_name", required=True, help="this node's name in the cluster file")
@click.option("--log-level", default="INFO", show_default=True)
@click.option("--balance-leaders", is_flag=True,
              help="spread shard leaders evenly over the nodes by itself (after failovers too)")
@click.option("--balance-period", type=click.FloatRange(0.05), default=5.0, show_default=True,
              help="seconds between the leader balancer's checks (with --balance-leaders)")
@click.option("--compact-every", type=click.IntRange(1), default=None,
              help="checkpoint a shard's state into the engine and compact its Raft log every N commands "
                   "(default 10,000): each checkpoint writes the keys changed since the last one, so lower means "
                   "shorter pauses and less held in memory, higher coalesces more overwrites")
@click.option("--engine-map-gib", type=click.IntRange(1), default=64, show_default=True,
              help="LMDB engine only: its size limit in GiB (address space reserved, not disk or memory used); "
                   "a node whose engine is full stops with an error saying so: restart it with a larger value")
@click.option("--fault", "faults", multiple=True, metavar="POINT[:VALUE[:COUNT[:MATCH]]]",
              help="TESTING ONLY: arm a fault point (see raftkv.server.api.FAULT_POINTS); repeatable")
@click.option("--unsafe-local-reads", is_flag=True,
              help="DANGEROUS, for fault-injection demos only: answer reads from the local copy")
@click.option("--unsafe-no-sync", is_flag=True,
              help="DANGEROUS, for fault-injection demos only: never fsync the storage engine, yet acknowledge "
                   "writes (a power loss loses them)")
@click.option("--unsafe-skip-locks", is_flag=True,
              help="DANGEROUS, TESTING ONLY (a negative control for raftkv-jepsen): one-shard writes ignore the "
                   "locks of cross-shard transactions, losing updates; every node must have the same setting")
@click.option("--unsafe-watch-miss", is_flag=True,
              help="DANGEROUS, TESTING ONLY (a negative control for raftkv-jepsen): EXEC misses writes to a "
                   "watched key made after WATCH, losing updates")
@click.option("--metrics-port", type=int, default=None,
              help="Prometheus /metrics, /health, /ready port (default: the node's metrics_port in the "
                   "cluster file; 0 disables)")
@click.option("--insecure", is_flag=True,
              help="allow listening beyond loopback without a cluster secret (trusted networks only)")
@click.option("--max-clients", type=click.IntRange(1), default=10_000, show_default=True)
@click.option("--max-request-bytes", type=click.IntRange(1024), default=1536 * 1024, show_default=True)
@click.option("--max-key-bytes", type=click.IntRange(1), default=64 * 1024, show_default=True)
@click.option("--max-value-bytes", type=click.IntRange(1), default=1024 * 1024, show_default=True)
@click.option("--pipeline-depth", type=click.IntRange(1), default=1024, show_default=True,
              help="commands in flight per connection before -BUSY")
@click.option("--idle-timeout", type=click.FloatRange(0), default=0.0, show_default=True,
              help="close client connections idle this many seconds (0 = never)")
@click.option("--txn-classic-2pc", is_flag=True,
              help="coordinate cross-shard writes with classic 2PC (three consensus rounds) instead of parallel "
                   "commits (one): needed while any node of a version before parallel commits still runs")
@click.option("--txn-no-wait-die", is_flag=True,
              help="no wait-die for cross-shard transactions: a PREPARE that meets a lock votes NO at once, "
                   "whatever the transactions' ages, and MSET/EXEC retries carry no priority (as before)")
@click.option("--request-timeout", type=click.FloatRange(0.1), default=5.0, show_default=True,
              help="seconds a node works on one client request (retries included) before it answers that the "
                   "outcome is unknown or that it was not applied; a client that waits longer sees that answer")
@click.option("--engine", "engine_kind", type=click.Choice(["rocksdb", "lmdb"]), default=None,
              help="storage engine for a new data directory (default lmdb; docs/engine.md compares them); an "
                   "existing one keeps its own, and naming another is an error")
@click.option("--election-timeout", default="120-300", show_default=True, metavar="MIN-MAX",
              help="milliseconds of silence from a leader before a follower asks for an election (random in "
                   "the range); raise it (e.g. 500-1000) where slow disks or a loaded machine cause needless "
                   "leader changes; every node of a cluster should use the same")
@click.option("--gc-freeze-period", type=click.FloatRange(0), default=FREEZE_PERIOD_S, show_default=True, metavar="SECONDS",
              help="move the objects that survived until now out of the garbage collector's reach this often, so "
                   "that a full collection walks only what is newer (long pauses stop every shard group's "
                   "heartbeats); 0: never (a reference cycle frozen while alive is never collected)")
def serve(config: str, node_name: str, log_level: str, balance_leaders: bool, balance_period: float,
          gc_freeze_period: float, compact_every: int | None, engine_map_gib: int, faults: tuple[str, ...],
          unsafe_local_reads: bool, unsafe_skip_locks: bool, unsafe_watch_miss: bool, metrics_port: int | None,
          insecure: bool, max_clients: int, max_request_bytes: int, max_key_bytes: int, max_value_bytes: int,
          pipeline_depth: int, idle_timeout: float, txn_classic_2pc: bool, txn_no_wait_die: bool,
          election_timeout: str, unsafe_no_sync: bool, request_timeout: float, engine_kind: str | None) -> None:
    """Run one node in the foreground."""
    from raftkv.raftfix import election_timeouts
    from raftkv.security import InsecureBindError
    from raftkv.server import Faults, Limits, Timing, run_node

    limits = Limits(request_bytes_max=max_request_bytes, key_bytes_max=max_key_bytes,
                    value_bytes_max=max_value_bytes, clients_max=max_clients, pipeline_depth_max=pipeline_depth,
                    idle_timeout_s=idle_timeout)
    timing = Timing(balance_period_s=balance_period if balance_leaders else 0.0,
                    txn_parallel_commits=not txn_classic_2pc, txn_wait_die=not txn_no_wait_die,
                    request_timeout_s=request_timeout, gc_freeze_period_s=gc_freeze_period)
    try:
        armed = Faults.parse(faults)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--fault") from None
    try:
        lo, hi = election_timeouts(election_timeout)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--election-timeout") from None
    try:
        run_node(config, node_name, unsafe_local_reads=unsafe_local_reads, log_level=log_level,
                 metrics_port=metrics_port, insecure=insecure, limits=limits, timing=timing, faults=armed,
                 compact_every_cmds=compact_every, engine_map_size=engine_map_gib << 30, engine_kind=engine_kind,
                 raft_overrides={"raftMinTimeout": lo, "raftMaxTimeout": hi}, unsafe_no_sync=unsafe_no_sync,
                 unsafe_skip_locks=unsafe_skip_locks, unsafe_watch_miss=unsafe_watch_miss)
    except InsecureBindError as e:
        raise click.ClickException(str(e)) from None
    except ValueError as e:
        raise click.ClickException(str(e)) from None


# -- data commands -------------------------------------------------------------------

@main.command()
@click.argument("key")
@click.argument("value")
@click.option("--ttl", type=click.FloatRange(min=0.001), default=None, help="expire the key after this many seconds")
@click.option("--lease", "lease_id", type=int, default=None, metavar="ID",
              help="attach the key to lease ID: it is deleted when the lease expires or is revoked")
@click.option("--fencing-token", "token", type=int, default=None, metavar="N",
              help="a lock holder's write: refused (exit 1) if a holder with a larger token wrote KEY first "
                   "(e.g. --fencing-token $RAFTKV_FENCING_TOKEN under 'raftkv lock')")
@cluster_option
def put(key: str, value: str, ttl: float | None, lease_id: int | None, token: int | None,
        cluster_file: str | None) -> None:
    """Set KEY to VALUE (durable on a majority when this returns)."""
    if sum(x is not None for x in (ttl, lease_id, token)) > 1:
        raise click.UsageError("give at most one of --ttl, --lease, --fencing-token")
    if token is not None:
        if not _with_client(cluster_file, lambda c: c.fenced_put(key, value, token)):
            click.echo(f"raftkv: refused: a holder with a token above {token} wrote {key!r} first", err=True)
            sys.exit(1)
    else:
        _with_lease(cluster_file, lambda c: c.put(key, value, ttl=ttl, lease=lease_id))
    click.echo("OK")


@main.command()
@click.argument("key")
@click.option("--stale", is_flag=True, help="read any replica's local copy (may be stale)")
@click.option("--prefix", is_flag=True, help="every key starting with KEY, in byte order: 'key value' lines")
@cluster_option
def get(key: str, stale: bool, prefix: bool, cluster_file: str | None) -> None:
    """Print the value of KEY (exit 1 if it does not exist)."""
    if prefix:
        if stale:
            raise click.UsageError("--prefix reads are linearizable; --stale does not apply")
        found = _with_client(cluster_file, lambda c: [click.echo(f"{k.decode(errors='replace')} "
                                                                 f"{v.decode(errors='replace')}")
                                                      for k, v in c.get_prefix(key)])
        sys.exit(0 if found else 1)
    value = _with_client(cluster_file, lambda c: c.stale_get(key) if stale else c.get(key))
    if value is None:
        click.echo(f"raftkv: key {key!r} not found", err=True)
        sys.exit(1)
    click.echo(value.decode(errors="replace"))


@main.command("del")
@click.argument("key")
@cluster_option
def delete(key: str, cluster_file: str | None) -> None:
    """Delete KEY (exit 1 if it did not exist)."""
    existed = _with_client(cluster_file, lambda c: c.delete(key))
    click.echo("1" if existed else "0")
    if not existed:
        sys.exit(1)


@main.command()
@click.argument("key")
@click.argument("expected")
@click.argument("new")
@click.option("--absent", is_flag=True, help="swap only if KEY does not exist (EXPECTED is ignored)")
@cluster_option
def cas(key: str, expected: str, new: str, absent: bool, cluster_file: str | None) -> None:
    """Set KEY to NEW only if its value is EXPECTED (exit 1 if it was not)."""
    swapped = _with_client(cluster_file, lambda c: c.cas(key, None if absent else expected, new))
    click.echo("OK" if swapped else "NOT SWAPPED")
    if not swapped:
        sys.exit(1)


@main.command()
@click.argument("key")
@click.option("--by", type=int, default=1, show_default=True, help="amount to add (negative to subtract)")
@cluster_option
def incr(key: str, by: int, cluster_file: str | None) -> None:
    """Add to the integer at KEY (absent counts as 0) and print the new value; applied exactly once."""
    click.echo(str(_with_client(cluster_file, lambda c: c.incr(key, by))))


@main.command()
@click.argument("key")
@click.argument("seconds", type=float)
@cluster_option
def expire(key: str, seconds: float, cluster_file: str | None) -> None:
    """Make KEY expire SECONDS from now (exit 1 if it does not exist)."""
    ok = _with_client(cluster_file, lambda c: c.expire(key, seconds))
    click.echo("1" if ok else "0")
    if not ok:
        sys.exit(1)


@main.command()
@click.argument("key")
@cluster_option
def ttl(key: str, cluster_file: str | None) -> None:
    """Print the seconds until KEY expires ('none' if it never does; exit 1 if it does not exist)."""
    left = _with_client(cluster_file, lambda c: c.ttl(key))
    if left is None:
        click.echo(f"raftkv: key {key!r} not found", err=True)
        sys.exit(1)
    click.echo("none" if left == float("inf") else f"{left:.3f}")


@main.command()
@click.argument("pattern", required=False)
@cluster_option
def keys(pattern: str | None, cluster_file: str | None) -> None:
    """List the keys (matching the Redis glob PATTERN), one per line, by SCAN."""
    _with_client(cluster_file, lambda c: [click.echo(k.decode(errors="replace")) for k in c.keys(pattern)])


# -- leases (raftkv.leases) --------------------------------------------------------------

def _with_lease(cluster_file: str | None, op: Callable[[Client], Any]) -> Any:
    """``_with_client``, but an unknown, expired or revoked lease exits 1 ("not found")."""
    def run(c: Client) -> Any:
        try:
            return op(c)
        except RaftKVError as e:
            if e.code != "NOLEASE":
                raise
            click.echo(f"raftkv: {e.message}", err=True)
            sys.exit(1)
    return _with_client(cluster_file, run)


@main.group()
def lease() -> None:
    """Leases: grant one, attach keys to it (put --lease ID), keep it alive, revoke it.

    An unknown, expired or revoked lease exits 1.
    """


@lease.command("grant")
@click.argument("ttl", type=click.IntRange(min=1))
@click.option("--near", default=None, metavar="KEY", help="home the lease on KEY's shard")
@cluster_option
def lease_grant(ttl: int, near: str | None, cluster_file: str | None) -> None:
    """Grant a lease of TTL seconds and print its id."""
    click.echo(str(_with_client(cluster_file, lambda c: c.lease_grant(ttl, near=near))))


@lease.command("keepalive")
@click.argument("lease_id", metavar="ID", type=int)
@click.option("--forever", is_flag=True, help="keep sending keep-alives every ttl/3 seconds until interrupted")
@cluster_option
def lease_keepalive(lease_id: int, forever: bool, cluster_file: str | None) -> None:
    """Push lease ID's deadline back to its full ttl; print the ttl (seconds)."""
    while True:
        ttl = _with_lease(cluster_file, lambda c: c.lease_keepalive(lease_id))
        click.echo(str(ttl))
        if not forever:
            return
        time.sleep(max(ttl / 3, 0.1))


@lease.command("revoke")
@click.argument("lease_id", metavar="ID", type=int)
@cluster_option
def lease_revoke(lease_id: int, cluster_file: str | None) -> None:
    """Revoke lease ID now: every key attached to it is deleted."""
    _with_lease(cluster_file, lambda c: c.lease_revoke(lease_id))
    click.echo("OK")


@lease.command("ttl")
@click.argument("lease_id", metavar="ID", type=int)
@cluster_option
def lease_ttl(lease_id: int, cluster_file: str | None) -> None:
    """Print lease ID's remaining and granted ttl (seconds) and how many keys are attached."""
    info = _with_lease(cluster_file, lambda c: c.lease_ttl(lease_id))
    click.echo(f"remaining {info.remaining} granted {info.granted} keys {info.keys}")

@main.command()
@click.argument("key")
@click.option("--prefix", is_flag=True, help="watch every key starting with KEY (all shards)")
@click.option("--rev", "rev", type=click.IntRange(0), default=None,
              help="start after this revision (each shard's, for --prefix); default: from now")
@click.option("--count", type=click.IntRange(1), default=None, help="exit after this many changes")
@cluster_option
def watch(key: str, prefix: bool, rev: int | None, count: int | None, cluster_file: str | None) -> None:
    """Print every change of KEY as it happens: 'SHARD:REV PUT key value' or 'SHARD:REV DEL key'.

    Runs until interrupted (or --count changes); survives leader changes without missing or
    repeating a change.  Revisions are per shard: order holds within a shard, not across shards.
    """

    def follow(c: Client) -> None:
        for n, e in enumerate(c.watch(key, prefix=prefix, start_revision=rev), start=1):
            line = f"{e.shard}:{e.revision} {'DEL' if e.deleted else 'PUT'} {e.key.decode(errors='replace')}"
            click.echo(line if e.value is None else f"{line} {e.value.decode(errors='replace')}")
            sys.stdout.flush()
            if count is not None and n >= count:
                return
    try:
        _with_client(cluster_file, follow)
    except KeyboardInterrupt:
        pass


# -- status ------------------------------------------------------------------------------

def _threshold_options(f: Any) -> Any:
    f = click.option("--lag-entries", default=1000, show_default=True, help="replica lag alert threshold")(f)
    f = click.option("--flaps-per-min", default=3, show_default=True, help="leader changes per minute")(f)
    f = click.option("--disk-free-min", default=0.10, show_default=True, help="free disk fraction")(f)
    f = click.option("--txn-stuck-s", default=30.0, show_default=True, help="open transaction age, seconds")(f)
    return f


def _report(cluster_file: str | None, lag_entries: int, flaps_per_min: int, disk_free_min: float,
            txn_stuck_s: float) -> dict:
    from raftkv.status import Thresholds, cluster_report

    with _client(cluster_file, timeout=3.0) as c:
        return cluster_report(c.map, c.node_status(),
                              Thresholds(lag_entries, flaps_per_min, disk_free_min, txn_stuck_s))


@main.command()
@cluster_option
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--watch", "watch", type=float, default=None, metavar="SECONDS", help="refresh every SECONDS")
@_threshold_options
def status(cluster_file: str | None, as_json: bool, watch: float | None, **th: Any) -> None:
    """Per shard: leader, term, commit index, replicas up and their lag, and the alerts that fire.

    Exit status 0 when healthy, 2 when any alert fires (no quorum, bare majority, lag, flapping,
    disk nearly full, stuck transactions, node down).
    """
    from raftkv.status import render_table

    while True:
        report = _report(cluster_file, **th)
        out = json.dumps(report, indent=2) if as_json else render_table(report)
        if watch is None:
            click.echo(out)
            sys.exit(0 if report["verdict"] == "ok" else 2)
        click.clear()
        click.echo(time.strftime("%H:%M:%S ") + out)
        time.sleep(watch)


@main.command()
@cluster_option
@_threshold_options
def alerts(cluster_file: str | None, **th: Any) -> None:
    """The alert checks as a list, one per line, for cron or a monitoring system (exit 2 if any)."""
    report = _report(cluster_file, **th)
    for line in report["warnings"]:
        click.echo(line)
    if not report["warnings"]:
        click.echo("OK no alerts")
    sys.exit(0 if not report["warnings"] else 2)


# -- operations: backup, restore, node add/remove/replace, leaders balance (raftkv.ops_cli) --
from raftkv.ops_cli import register as _register_ops  # noqa: E402

_register_ops(main)
# -- end operations --

# -- transactions (raftkv.txnclient) -------------------------------------------------------

@main.command()
@click.argument("pairs", nargs=-1, required=True)
@cluster_option
def mset(pairs: tuple[str, ...], cluster_file: str | None) -> None:
    """Set KEY1 VALUE1 KEY2 VALUE2 ... atomically (all or none, across shards)."""
    if len(pairs) % 2:
        raise click.UsageError("mset takes KEY VALUE pairs")
    with _client(cluster_file) as c:
        try:
            c.mset(dict(zip(pairs[0::2], pairs[1::2], strict=True)))
        except RaftKVError as e:
            _fail(e)
    click.echo("OK")


@main.command()
@click.argument("source", type=click.File("rb"))
@click.option("--format", "fmt", type=click.Choice(["tsv", "jsonl"]), default="tsv", show_default=True,
              help="tsv: KEY<TAB>VALUE per line; jsonl: {\"key\": ..., \"value\": ...} per line")
@click.option("--parallel", default=12, show_default=True, help="batches in flight")
@cluster_option
def load(source, fmt: str, parallel: int, cluster_file: str | None) -> None:
    """Bulk-load keys from SOURCE (a file, or - for stdin), fast: one-shard batches of up to 500 keys.

    Each batch is atomic and applied once; the load as a whole is not atomic: after a failure, run it
    again (it writes the same values again). Progress goes to stderr.
    """
    t0 = time.monotonic()
    shown = [t0]

    def progress(n: int) -> None:
        now = time.monotonic()
        if now - shown[0] >= 1.0:
            shown[0] = now
            click.echo(f"loaded {n:,} keys ({n / (now - t0):,.0f} keys/s)", err=True)

    with _client(cluster_file) as c:
        try:
            n = c.put_many(parse_lines(source, fmt), parallel=parallel, progress=progress)
        except ValueError as e:
            click.echo(f"raftkv: error: {source.name}: {e} (batches before it were written; fix the file "
                       "and load it again)", err=True)
            sys.exit(2)
        except RaftKVError as e:
            _fail(e)
    took = time.monotonic() - t0
    click.echo(f"loaded {n:,} keys in {took:.1f} s ({n / max(took, 1e-9):,.0f} keys/s)")


@main.command()
@click.option("--if", "ifs", multiple=True, metavar="'KEY = V'|'KEY rev N'|'KEY exists'|'KEY missing'")
@click.option("--then", "thens", multiple=True, metavar="'put K V'|'del K'|'get K'|'append K S'")
@click.option("--else", "elses", multiple=True, metavar="'put K V'|'del K'|'get K'|'append K S'")
@click.option("--file", "doc", type=click.File("r"), default=None,
              help='JSON {"if": [...], "then": [...], "else": [...]} of the same strings; - for stdin')
@click.option("--retries", default=5, show_default=True, help="retries after a TXNCONFLICT/TRYAGAIN abort")
@cluster_option
def txn(ifs: tuple[str, ...], thens: tuple[str, ...], elses: tuple[str, ...], doc, retries: int,
        cluster_file: str | None) -> None:
    """Conditional transaction: if every compare holds run the then-ops, else the else-ops.

    Prints SUCCEEDED or FAILED (the branch), then one line per op result; exit 0 when the
    then-branch ran, 1 when the else-branch ran, 2 on error.
    """
    from raftkv.txnclient import build_from_spec

    ifs_l, thens_l, elses_l = list(ifs), list(thens), list(elses)
    if doc is not None:
        try:
            spec = json.load(doc)
        except ValueError as e:
            raise click.UsageError(f"--file: not JSON: {e}") from None
        ifs_l += spec.get("if", [])
        thens_l += spec.get("then", [])
        elses_l += spec.get("else", [])
    with _client(cluster_file) as c:
        try:
            t = build_from_spec(c.txn(), ifs_l, thens_l, elses_l)
            r = t.commit(retries=retries)
        except ValueError as e:
            raise click.UsageError(str(e)) from None
        except RaftKVError as e:
            _fail(e)
    click.echo("SUCCEEDED" if r.succeeded else "FAILED")
    for v in r.results:
        click.echo("(nil)" if v is None else ("OK" if v is True else (v.decode(errors="replace")
                                                                     if isinstance(v, bytes) else str(v))))
    sys.exit(0 if r.succeeded else 1)


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--ttl", default=10.0, show_default=True,
              help="seconds the lock's lease outlives its last keep-alive (rounded up to whole seconds)")
@click.option("--wait", default=None, type=float, help="seconds to wait for the lock (default: forever)")
@cluster_option
def lock(name: str, command: tuple[str, ...], ttl: float, wait: float | None, cluster_file: str | None) -> None:
    """Run COMMAND while holding lock NAME (raftkv lock NAME -- cmd args...).

    The lock is held through a lease kept alive in the background: if this process dies or
    stops, the lock is released TTL seconds later and the next holder gets a larger token.
    The command gets the fencing token in RAFTKV_FENCING_TOKEN and should pass it to what it
    writes (docs/leases.md); the exit status is the command's (3 if the lock was lost while
    it ran, 4 if it could not be acquired in time).
    """
    import subprocess

    from raftkv.client import LockTimeout

    with _client(cluster_file) as c:
        try:
            held = c.lock(name, ttl=ttl, wait=wait)
            held.acquire()
        except LockTimeout as e:
            click.echo(f"raftkv: {e}", err=True)
            sys.exit(4)
        except RaftKVError as e:
            _fail(e)
        try:
            rc = subprocess.call(list(command), env={**os.environ, "RAFTKV_FENCING_TOKEN": str(held.token)})
        finally:
            held.release()
        if held.lost:
            click.echo(f"raftkv: lock {name} was lost while the command ran", err=True)
            sys.exit(3)
        sys.exit(rc)


# -- bench (owned by the raftkv/bench/ package; keep this block small) --------------------------------
from raftkv.bench.cli import register as _register_bench  # noqa: E402

_register_bench(main)
# -- end bench -------------------------------------------------------------------------------------


if __name__ == "__main__":
    main()
