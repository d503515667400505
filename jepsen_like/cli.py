"""``raftkv-jepsen``: command-line entry point (a click group).

Subcommands live in their own modules and are attached with
``main.add_command(...)``; this module only defines the group and ``check``.

Exit codes of ``check``: 0 linearizable, 1 not linearizable, 2 unknown (time or
state limit reached), 3 the history could not be read.  With ``--model
elle-rw`` / ``elle-append`` the history is checked by the Elle checker
(:mod:`jepsen_like.elle`) instead: 0 valid, 1 invalid, 2 unknown, 3 unreadable.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from . import edn, elle, sets
from .checker import LINEARIZABLE, NOT_LINEARIZABLE, check_file
from .history import FORMATS, HistoryError, detect_format, read_history
from .models import KNOSSOS_MODEL_NAMES, MODEL_NAMES, knossos_model
from .nemesis import FAULT_KINDS, OPTIONAL_KINDS
from .timeline import write_timeline

EXIT_CODES = {LINEARIZABLE: 0, NOT_LINEARIZABLE: 1}
EXIT_UNKNOWN = 2
EXIT_BAD_INPUT = 3
ELLE_MODELS = {"elle-rw": "rw-register", "elle-append": "list-append"}


@click.group()
def main() -> None:
    """Jepsen-like tools for raftkv: history checking (and running tests)."""


@main.command("check")
@click.argument("history", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", type=click.Choice([*MODEL_NAMES, *ELLE_MODELS, "set"]), default=None,
              help="Model (default: etcd for jepsen-log, kv-append for porcupine-kv, kv for jsonl); "
                   "elle-rw / elle-append: transactions checked by the Elle checker; set: add/read histories "
                   "checked per element (lost, stale, unexpected, duplicated).")
@click.option("--format", "fmt", type=click.Choice(["auto", *FORMATS]), default="auto", show_default=True)
@click.option("--timeout", "timeout_s", type=float, default=None, help="Give up (verdict unknown) after S seconds.")
@click.option("--max-states", type=int, default=None, help="Give up (verdict unknown) after N search states.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the HTML timeline here (default: <history>.timeline.html, only on a violation).")
@click.option("--consistency-model", "consistency_models", multiple=True,
              type=click.Choice(elle.MODEL_NAMES), help="Elle only: the model(s) to check "
              "(repeatable; default strict-serializable).")
@click.option("--json", "as_json", is_flag=True, help="Elle only: print the result as JSON.")
@click.option("--initial", default="0", show_default=True,
              help="knossos-edn only: the registers' initial value, in EDN (nil for Knossos's CLI default).")
def check_cmd(history: Path, model: str | None, fmt: str, timeout_s: float | None,
              max_states: int | None, html_path: Path | None, consistency_models: tuple[str, ...],
              as_json: bool, initial: str) -> None:
    """Check HISTORY for linearizability (or, with an elle-* model, for transactional anomalies);
    exit 0 (yes), 1 (no) or 2 (unknown).

    A Knossos EDN history (--format knossos-edn, detected when the file starts with '[') is checked with
    Knossos's semantics: --model cas-register (default), multi-register or mutex."""
    if model in ELLE_MODELS:
        _check_elle(history, ELLE_MODELS[model], fmt, consistency_models or ("strict-serializable",), as_json)
    if model == "set":
        _check_set(history, fmt, as_json)
    try:
        if fmt == "knossos-edn" or (fmt == "auto" and detect_format(history.read_text(encoding="utf-8"),
                                                                   history.name) == "knossos-edn"):
            if model not in (None, *KNOSSOS_MODEL_NAMES):
                raise ValueError(f"a Knossos EDN history is checked with one of Knossos's models "
                                 f"({', '.join(KNOSSOS_MODEL_NAMES)}), not {model!r}")
            model = knossos_model(model or "cas-register", edn.loads(initial))  # type: ignore[assignment]
        res, ops, fmt = check_file(history, model=model, fmt=fmt, timeout_s=timeout_s, max_states=max_states)
    except (HistoryError, ValueError, OSError) as e:
        click.echo(f"error: cannot check {history}: {e}", err=True)
        raise SystemExit(EXIT_BAD_INPUT) from e
    click.echo(f"{history}: {res.verdict.replace('_', ' ').upper()}")
    click.echo(f"  format {fmt}, model {res.model}, {len(ops)} ops; {res.summary()}")
    if res.verdict == NOT_LINEARIZABLE:
        click.echo(f"  operations that cannot be linearized ({len(res.failing_ops)}):")
        for op in res.failing_ops:
            click.echo(f"    {op.describe()}")
        click.echo(f"  longest linearizable prefix: {len(res.longest_prefix)} of {len(res.failed_partition)} ops "
                   "in the failing partition")
    if html_path is None and res.verdict == NOT_LINEARIZABLE:
        html_path = history.with_name(history.name + ".timeline.html")
    if html_path is not None:
        write_timeline(html_path, ops, failing_ops=res.failing_ops, longest_prefix=res.longest_prefix,
                       title=f"{history.name}: {res.verdict}", verdict=res.summary())
        click.echo(f"  timeline: {html_path}")
    raise SystemExit(EXIT_CODES.get(res.verdict, EXIT_UNKNOWN))


def _check_elle(history: Path, workload: str, fmt: str, models: tuple[str, ...], as_json: bool) -> None:
    _check_whole(history, fmt, as_json, f"elle {workload}, checking {', '.join(models)}",
                 lambda ops: elle.check(ops, workload, models=models))


def _check_set(history: Path, fmt: str, as_json: bool) -> None:
    _check_whole(history, fmt, as_json, "set (linearizable)", sets.check_set)


def _check_whole(history: Path, fmt: str, as_json: bool, label: str, checker: Callable[[list], Any]) -> None:
    """Check with a checker whose result has ``verdict`` (valid / invalid / unknown), ``summary()``,
    ``lines()`` and ``to_dict()`` (Elle, set); exit 0 valid, 1 invalid, 2 unknown, 3 unreadable."""
    try:
        ops, fmt = read_history(history, fmt)
        res = checker(ops)
    except (HistoryError, ValueError, OSError) as e:
        click.echo(f"error: cannot check {history}: {e}", err=True)
        raise SystemExit(EXIT_BAD_INPUT) from e
    if as_json:
        click.echo(json.dumps(res.to_dict(), indent=1, default=repr))
    else:
        click.echo(f"{history}: {res.verdict.upper()}")
        click.echo(f"  format {fmt}, {label}; {res.summary()}")
        for line in res.lines():
            click.echo(f"  {line}")
    raise SystemExit({"valid": 0, "invalid": 1}.get(res.verdict, EXIT_UNKNOWN))


# --- raftkv-jepsen run (jepsen_like.runner) ---------------------------------------- begin
def _nemesis_option(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    from .nemesis import parse_nemesis

    try:
        parse_nemesis(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    return value


@main.command("run")
@click.option("--workload", type=click.Choice(["register", "counter", "bank", "txn", "lock", "append", "set"]),
              default="register", show_default=True,
              help="lock: acquire/release under leases, checked with the mutex model; append: Elle list-append "
                   "transactions; set: unique adds and whole-set reads, checked per element (lost, stale, ...)")
@click.option("--nemesis", default="none", show_default=True, callback=_nemesis_option,
              help="faults to inject on a schedule (all = every kind: kill, pause, partition, member, clock, slow-disk, disk, "
                   "compaction, power; "
                   "or a comma-separated mix, e.g. kill,member; reshard (one 'raftkv shard add' per window) and "
                   "clock-forward are never part of all)")
@click.option("--time", "time_s", type=float, default=60.0, show_default=True, help="seconds of load")
@click.option("--clients", type=click.IntRange(1, 200), default=10, show_default=True)
@click.option("--rate", type=float, default=100.0, show_default=True,
              help="target ops/s over all clients (open loop); 0 = closed loop")
@click.option("--nodes", type=click.IntRange(1, 9), default=3, show_default=True)
@click.option("--shards", type=click.IntRange(1, 16), default=3, show_default=True)
@click.option("--seed", type=int, default=None, help="seed of the schedule and the clients (default: random)")
@click.option("--store", type=click.Path(file_okay=False), default="store", show_default=True,
              help="runs go to STORE/<workload>-<timestamp>/")
@click.option("--unsafe-local-reads", is_flag=True,
              help="start the nodes in the deliberately unsafe mode (reads from the local copy)")
@click.option("--read-any-node/--no-read-any-node", default=True, show_default=True,
              help="register and set: each client bound to a fixed node (client i -> node i mod N), reads as plain "
                   "RESP GETs and writes as session writes through it, which forwards what it does not lead; "
                   "--no-read-any-node: everything through the routing Client")
@click.option("--read-routing", type=click.Choice(["own", "shared"]), default="own", show_default=True,
              help="register and set reads through the routing Client: own = each client reads through a Client of "
                   "its own whose leader cache only its reads refresh; shared = through the client's write Client, "
                   "whose failed writes re-route the reads too")
@click.option("--attempt-timeout", type=click.FloatRange(0), default=1.0, show_default=True,
              help="register and set: seconds one attempt (one node's reply) may take before the routing Client "
                   "re-routes the request within --op-timeout; 0 = an attempt may take the whole op timeout")
@click.option("--op-timeout", type=float, default=None,
              help="client timeout per op (s); default 4, set: 1 (adds caught in a failover end indeterminate)")
@click.option("--recovery", type=float, default=30.0, show_default=True,
              help="max seconds to wait for the cluster (and final reads) after the heal")
@click.option("--keys-per-shard", type=click.IntRange(1, 100), default=2, show_default=True)
@click.option("--key-period", type=float, default=5.0, show_default=True,
              help="register keys rotate every S seconds (0 = never)")
@click.option("--check-timeout", type=float, default=120.0, show_default=True,
              help="checker time limit (verdict unknown beyond it)")
@click.option("--netns", type=click.Choice(["auto", "require", "off"]), default="auto", show_default=True,
              help="run inside a private network namespace (needed for partitions)")
@click.option("--keep-data", is_flag=True, help="keep the nodes' data directories")
@click.option("--fault-min", type=float, default=2.0, show_default=True)
@click.option("--fault-max", type=float, default=4.0, show_default=True)
@click.option("--quiet-min", type=float, default=2.0, show_default=True)
@click.option("--quiet-max", type=float, default=4.0, show_default=True)
@click.option("--partition-shapes", default="halves,isolate-leader,majority-ring", show_default=True,
              help="comma-separated partition shapes the partition nemesis picks from")
@click.option("--unsafe-lock-lapse", is_flag=True,
              help="lock workload, deliberately unsafe: holders stop their keep-alives and hold past the lease "
                   "(1 s), so the lock lapses under them: the mutex check must fail")
@click.option("--unsafe-skip-locks", is_flag=True,
              help="DANGEROUS negative control: start every node with `raftkv serve --unsafe-skip-locks` (one-shard "
                   "writes ignore cross-shard transactions' locks): the append workload's Elle check (txn: its linearizable check) "
                   "must fail")
@click.option("--unsafe-watch-miss", is_flag=True,
              help="DANGEROUS negative control: start every node with `raftkv serve --unsafe-watch-miss` (EXEC "
                   "misses writes after WATCH): the counter workload's lost-update check must fail")
@click.option("--compact-every", type=click.IntRange(1), default=None,
              help="nodes compact each shard's Raft log every N commands (default: the node's): small values force "
                   "compactions and snapshot installs to lagging or restarted followers during the faults")
@click.option("--ttl-ops", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="register: this fraction of the puts are SET k v PX ms, half with a short ttl (expires during "
                   "the run), half with a day; checked with the kv-expiry model")
@click.option("--auth", is_flag=True,
              help="run with authentication and roles: the clients' user may only read and write the workloads' keys")
@click.option("--edn-out", type=click.Path(file_okay=False), default=None,
              help="also write the history as Knossos EDN into this directory (register: one cas-register "
                   "history per key, lock: one mutex history per lock, txn: one multi-register history), "
                   "for `raftkv-jepsen check --format knossos-edn` or Knossos itself")
@click.option("--unsafe-no-sync", is_flag=True,
              help="start the nodes in the deliberately unsafe mode that never fsyncs (a negative control for the "
                   "power nemesis: a power loss must lose acknowledged writes, and the checks must see it)")
@click.option("--disk-mib", type=click.IntRange(4, 1024), default=32, show_default=True,
              help="disk nemesis: size of the tmpfs each node's data directory is mounted on (it vanishes with "
                   "the run's namespace, --keep-data included)")
def run_cmd(time_s: float, **kw: object) -> None:
    """Start a fresh cluster, run a workload under faults, check it; exit 0 only if every check passed.

    Exit codes: 0 pass, 1 a check failed, 2 inconclusive or harness error, 3 unavailable here.
    """
    from .runner import RunConfig, run

    raise SystemExit(run(RunConfig(time=time_s, **kw)))  # type: ignore[arg-type]
# --- raftkv-jepsen run ------------------------------------------------------------------ end


def _list_option(choices: tuple[str, ...]) -> object:
    def parse(_ctx: click.Context, param: click.Parameter, value: str) -> list[str]:
        items = [x.strip() for x in value.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise click.BadParameter(f"unknown {', '.join(bad) or repr(value)}; choose from {', '.join(choices)}")
        return items
    return parse


@main.command("soak")
@click.option("--minutes", type=click.FloatRange(0.1), required=True, help="how long to keep starting runs")
@click.option("--run-time", type=click.FloatRange(3), default=20.0, show_default=True, help="seconds of load per run")
@click.option("--workloads", default="register,counter,bank,txn,lock,append,set", show_default=True,
              callback=_list_option(("register", "counter", "bank", "txn", "lock", "append", "set")))
@click.option("--nemeses", default=",".join((*FAULT_KINDS, *OPTIONAL_KINDS, "all")), show_default=True,
              callback=_list_option(("none", *FAULT_KINDS, *OPTIONAL_KINDS, "all")),
              help="each run uses one of these --nemesis values")
@click.option("--store", type=click.Path(file_okay=False), default="store", show_default=True,
              help="the soak goes to STORE/soak-<timestamp>/ (each run's directory, runs.log, soak.json, summary.md)")
@click.option("--seed", type=int, default=None, help="seed of the rotation and the runs' seeds (default: random)")
@click.argument("run_args", nargs=-1, type=click.UNPROCESSED)
def soak_cmd(minutes: float, run_time: float, workloads: list[str], nemeses: list[str], store: str,
             seed: int | None, run_args: tuple[str, ...]) -> None:
    """Rotate workloads x nemeses in back-to-back runs (fresh seeds) for MINUTES; write one summary table.

    Extra arguments after -- go to every `raftkv-jepsen run` (e.g. -- --clients 8 --rate 80).
    Exit 0 if every run passed, 1 if a check failed, 2 if a run was inconclusive or a harness error."""
    from .soak import soak

    raise SystemExit(soak(minutes, run_time, store, workloads, nemeses, seed, list(run_args)))


if __name__ == "__main__":  # pragma: no cover
    main()
