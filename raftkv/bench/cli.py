"""``raftkv bench``: the benchmark's command line (click), registered on the ``raftkv`` group by ``register``.

``raftkv bench [OPTIONS]`` runs the side-by-side suite; ``raftkv bench failover``, ``raftkv bench scale`` and
``raftkv bench watch`` run the other benchmarks (``bench/failover.py`` and ``bench/scale.py`` are these same
commands).  The suite's ``--failover TRIALS`` and ``--scale`` switches still work and run those with the suite's options.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from click.core import ParameterSource

from raftkv.bench.systems import ALL_PEERS, FAILOVER_PEERS
from raftkv.bench.workloads import WORKLOADS

# Every ``raftkv`` command, ``raftkv serve`` on each node included, builds this group: the benchmark's
# machinery (multiprocessing, the load generator, matplotlib) is imported only when a benchmark runs.


def _split(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _ints(ctx: click.Context, param: click.Parameter, text: str) -> list[int]:
    try:
        return [int(x) for x in _split(text)]
    except ValueError:
        raise click.BadParameter(f"want a comma list of integers, got {text!r}") from None


def _workloads(ctx: click.Context, param: click.Parameter, text: str) -> list[str]:
    if text == "all":
        return list(WORKLOADS)
    names = _split(text)
    unknown = [w for w in names if w not in WORKLOADS]
    if unknown:
        raise click.BadParameter(f"unknown workload {unknown[0]!r}; choose from {', '.join(WORKLOADS)} or 'all'")
    return names


def _peers(ctx: click.Context, param: click.Parameter, text: str) -> list[str]:
    return [] if text in ("none", "") else _split(text)


def _write_json(doc: dict, path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(doc, indent=1))
        click.echo(f"wrote {path}")


json_option = click.option("--json", "json_path", metavar="PATH", help="write the results as JSON to PATH")


@click.group("bench", invoke_without_command=True)
@click.option("--workload", "workloads", default="put", show_default=True, callback=_workloads,
              help=f"comma list or 'all': {','.join(WORKLOADS)}")
@click.option("--clients", default="1,32", show_default=True, callback=_ints, help="comma list of concurrencies")
@click.option("--duration", type=float, default=10.0, show_default=True, help="measured seconds per point")
@click.option("--warmup", type=float, default=1.0, show_default=True, help="unmeasured seconds before each point")
@click.option("--shards", type=int, default=3, show_default=True, help="raftkv shards")
@click.option("--peers", default=",".join(ALL_PEERS), show_default=True, callback=_peers,
              help=f"comma list ({','.join(ALL_PEERS)}; etcd is the JSON gateway, etcd-grpc the gRPC API) or 'none'")
@click.option("--keyspace", type=int, default=10_000, show_default=True, help="keys preloaded and used")
@click.option("--value-size", type=int, default=100, show_default=True, help="bytes per value")
@click.option("--dist", type=click.Choice(["uniform", "zipf"]), default="uniform", show_default=True,
              help="key distribution")
@click.option("--procs", type=int, default=0, help="generator processes (default min(clients, nproc))")
@click.option("--via", type=click.Choice(["raw", "client"]), default="raw", show_default=True,
              help="raw sockets, or raftkv.Client in threads (raftkv only)")
@click.option("--rounds", type=click.IntRange(1), default=1, show_default=True,
              help="measure every point this many times per system (order rotated) and report the medians")
@click.option("--no-redis-benchmark", is_flag=True, help="skip redis-benchmark")
@json_option
@click.option("--png", "png_path", metavar="PATH", help="write the chart to PATH (needs matplotlib)")
@click.option("--failover", "failover_trials", type=int, metavar="TRIALS",
              help="run the failover benchmark instead (as 'raftkv bench failover')")
@click.option("--scale", "scale", is_flag=True, help="run the scale benchmark instead (as 'raftkv bench scale')")
@click.pass_context
def bench(ctx: click.Context, workloads: list[str], clients: list[int], duration: float, warmup: float,
          shards: int, peers: list[str], keyspace: int, value_size: int, dist: str, procs: int, via: str,
          rounds: int, no_redis_benchmark: bool, json_path: str | None, png_path: str | None, failover_trials: int | None,
          scale: bool) -> None:
    """Benchmark a fresh local cluster side by side with etcd and Redis (those on PATH).

    Every (workload, clients) point runs on each system in turn; the table, and the JSON and chart if asked
    for, compare them.  See docs/benchmarks.md for what each workload sends.
    """
    if ctx.invoked_subcommand is not None:
        # The suite's options would be silently ignored by a subcommand: say so instead.
        given = [p.opts[0] for p in ctx.command.params
                 if ctx.get_parameter_source(p.name or "") not in (ParameterSource.DEFAULT, None)]
        if given:
            raise click.UsageError(f"{', '.join(given)} belong to the suite, not to "
                                   f"'raftkv bench {ctx.invoked_subcommand}'; put its own options after it")
        return
    from raftkv.bench.failover import run_failover
    from raftkv.bench.scale import run_scale
    from raftkv.bench.suite import SuiteConfig, run_suite

    if failover_trials:
        doc = run_failover(failover_trials, systems=("raftkv", *peers), shards=shards, keyspace=keyspace)
    elif scale:
        doc = run_scale(clients=max(clients), duration=duration, value_size=value_size)
    else:
        doc = run_suite(SuiteConfig(workloads, clients, duration, warmup, shards, peers, keyspace, value_size,
                                    dist, procs, via, not no_redis_benchmark, png_path=png_path, rounds=rounds))
    _write_json(doc, json_path)


@bench.command("failover")
@click.option("--trials", type=int, default=10, show_default=True, help="leader kills per system")
@click.option("--peers", default=",".join(FAILOVER_PEERS), show_default=True,
              help=f"comma list ({','.join(FAILOVER_PEERS)}) or 'none'")
@click.option("--shards", type=int, default=3, show_default=True, help="raftkv shards")
@click.option("--load-clients", type=int, default=8, show_default=True, help="clients of the put load")
@click.option("--settle", type=float, default=5.0, show_default=True,
              help="seconds between a restart and the next kill")
@click.option("--keyspace", type=int, default=10_000, show_default=True, help="keys preloaded and used")
@click.option("--skip-raftkv", is_flag=True, help="only the peers")
@json_option
def failover_cmd(trials: int, peers: str, shards: int, load_clients: int, settle: float, keyspace: int,
                 skip_raftkv: bool, json_path: str | None) -> None:
    """kill -9 a shard leader under put load N times: time from the kill to the first successful write."""
    from raftkv.bench.failover import run_failover

    systems = (() if skip_raftkv else ("raftkv",)) + tuple([] if peers == "none" else _split(peers))
    doc = run_failover(trials, systems=systems, shards=shards, load_clients=load_clients, settle=settle,
                       keyspace=keyspace)
    _write_json(doc, json_path)


@bench.command("scale")
@click.option("--shards", "shard_counts", default="1,3,6", show_default=True, callback=_ints,
              help="comma list of shard counts ('' for none)")
@click.option("--sizes", default="10000,100000,1000000", show_default=True, callback=_ints,
              help="comma list of key counts, loaded one after the other")
@click.option("--clients", type=int, default=32, show_default=True)
@click.option("--duration", type=float, default=8.0, show_default=True, help="measured seconds per point")
@click.option("--value-size", type=int, default=100, show_default=True, help="bytes per value")
@click.option("--memory-limit-mb", type=click.IntRange(16), default=None,
              help="run each node of the keys-loaded part in a memory cgroup of this many MB (Linux, root): what it "
                   "needs, not what the kernel lets it keep mapped")
@click.option("--rounds", type=click.IntRange(1), default=1, show_default=True,
              help="measure the shard counts this many times, on fresh clusters in rotated order; report medians")
@json_option
def scale_cmd(shard_counts: list[int], sizes: list[int], clients: int, duration: float, value_size: int,
              memory_limit_mb: int | None, rounds: int, json_path: str | None) -> None:
    """Throughput and p99 vs shards and vs keys loaded; RSS per million keys; restart catch-up time."""
    from raftkv.bench.scale import run_scale

    doc = run_scale(tuple(shard_counts), tuple(sizes), clients=clients, duration=duration, value_size=value_size,
                    memory_limit_mb=memory_limit_mb, rounds=rounds)
    _write_json(doc, json_path)


@bench.command("watch")
@click.option("--writers", type=int, default=32, show_default=True, help="closed-loop clients putting watched keys")
@click.option("--duration", type=float, default=6.0, show_default=True, help="measured seconds")
@click.option("--warmup", type=float, default=1.0, show_default=True, help="unmeasured seconds first")
@click.option("--shards", type=int, default=3, show_default=True, help="raftkv shards")
@click.option("--keyspace", type=int, default=1000, show_default=True, help="keys written (all under the watched prefix)")
@click.option("--value-size", type=int, default=100, show_default=True, help="bytes per value")
@click.option("--one-key", is_flag=True, help="watch one key, and every writer puts that key")
@json_option
def watch_cmd(writers: int, duration: float, warmup: float, shards: int, keyspace: int, value_size: int,
              one_key: bool, json_path: str | None) -> None:
    """One watcher, W writers: events/s delivered to the watcher, delivery p50/p99 against the puts' p99,
    and whether every acknowledged put arrived exactly once (see raftkv/bench/watch.py)."""
    from raftkv.bench.watch import WatchBenchConfig, run_watch_bench

    doc = run_watch_bench(WatchBenchConfig(writers, duration, warmup, shards, keyspace, value_size, one_key))
    _write_json(doc, json_path)


def register(main: click.Group) -> None:
    """Add ``bench`` to the ``raftkv`` command group."""
    main.add_command(bench)

