"""Operations commands of the ``raftkv`` CLI: backup, restore, node add/remove/replace, leaders balance,
replica rebalancing (``rebalance``) and the key-movement plans (``shard plan``).

``raftkv.cli`` calls ``register(main)``; the commands live here so the main CLI
module stays small.  Exit status: 0 success, 2 error (the message says why); ``backup`` exits 75 (EX_TEMPFAIL)
when it was refused for now and can simply be run again later (a shard move under way, a fence that lapsed).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click


def cluster_path(cluster_file: str | None) -> str:
    """The cluster file to use: --cluster / RAFTKV_CLUSTER, else ./.raftkv/cluster.toml (must exist)."""
    from raftkv.cluster import DEFAULT_DIR

    path = cluster_file or os.path.join(DEFAULT_DIR, "cluster.toml")
    if not os.path.exists(path):
        raise click.ClickException(
            f"no cluster file at {path}: start one with 'raftkv cluster up' or pass --cluster FILE")
    return path


def client_kw() -> dict:
    """The root command's --password/--user/--tls, for Client(...)."""
    opts = click.get_current_context().find_root().obj or {}
    return {"password": opts.get("password"), "username": opts.get("user"), "tls": opts.get("tls", False)}


EXIT_RETRY = 75  # EX_TEMPFAIL: refused for now, nothing changed; run the same command again later


def _die(msg: str, status: int = 2) -> None:
    click.echo(f"raftkv: error: {msg}", err=True)
    sys.exit(status)


cluster_option = click.option(
    "--cluster", "cluster_file", envvar="RAFTKV_CLUSTER", default=None, metavar="FILE",
    help="cluster file (default: $RAFTKV_CLUSTER or ./.raftkv/cluster.toml)")


@click.command("backup")
@click.argument("file", type=click.Path(dir_okay=False))
@cluster_option
@click.option("--fence-ttl", default=60.0, show_default=True,
              help="seconds after which the backup fence lapses by itself if this command dies")
@click.option("--timeout", default=60.0, show_default=True, help="seconds to wait per shard (leader, drain)")
def backup_cmd(file: str, cluster_file: str | None, fence_ttl: float, timeout: float) -> None:
    """Write an online backup of every shard to FILE while the cluster serves.

    Consistent per shard (a linearizable snapshot) and across shards (no transaction is half in it);
    the file carries a header (format version, shard map, time, key counts) and a SHA-256 checksum.
    Refused, with exit status 75 and nothing written, while a shard is being added or removed (or if
    one starts or ends during the backup): run it again after the move.
    """
    from raftkv.backup import BackupError, take_backup
    from raftkv.client import Client

    with Client(cluster=cluster_path(cluster_file), timeout=timeout, **client_kw()) as c:
        try:
            hdr = take_backup(c, file, fence_ttl_s=fence_ttl, log=lambda m: click.echo(m, err=True))
        except BackupError as e:
            _die(str(e), EXIT_RETRY if e.retryable else 2)
    click.echo(f"backup {file}: {hdr['key_count']} keys in {hdr['shards']} shards, "
               f"{hdr['body_bytes']} bytes, taken in {hdr['duration_s']} s")


@click.command("restore")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--dir", "directory", required=False, help="directory for the new cluster (cluster.toml, data/)")
@click.option("--config", default=None, type=click.Path(exists=True, dir_okay=False),
              help="cluster file of the new cluster (default: the backup's layout on free loopback ports)")
@click.option("--check", "check_only", is_flag=True, help="only verify the file and print its header")
@click.option("--keep-running", is_flag=True, help="leave the restored cluster's nodes running")
@click.option("--timeout", default=60.0, show_default=True)
def restore_cmd(file: str, directory: str | None, config: str | None, check_only: bool, keep_running: bool,
                timeout: float) -> None:
    """Create a new cluster's data in DIR from backup FILE (refuses corrupt or mismatched files)."""
    from raftkv.backup import BackupError, read_backup, restore

    try:
        if check_only:
            bk = read_backup(file)
            hdr = {k: v for k, v in bk.header.items() if k != "shard_map"}
            click.echo(json.dumps(hdr, indent=2))
            click.echo(f"{file}: OK (checksum verified, {bk.header['key_count']} keys)")
            return
        if not directory:
            raise click.UsageError("--dir is required (or use --check)")
        lc = restore(file, directory, config=config, keep_running=keep_running, timeout=timeout,
                     log=lambda m: click.echo(m, err=True))
    except BackupError as e:
        _die(str(e))
    state = "running" if keep_running else "stopped; start it with 'raftkv cluster up --dir " + directory + "'"
    click.echo(f"restored into {lc.dir} (cluster file {lc.config}); nodes {state}")


@click.group("node")
def node_group() -> None:
    """Change the cluster's members (every shard group, one server at a time)."""


def _operator(cluster_file: str | None, timeout: float):
    from raftkv.membership import Operator

    return Operator(cluster_path(cluster_file), timeout=timeout, say=lambda m: click.echo(m, err=True),
                    client_kw=client_kw())


def _membership_errors(fn):
    import functools

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        from raftkv.cluster import ClusterError
        from raftkv.membership import MembershipError
        from shards.plan import PlanError
        from shards.shardmap import ShardMapError

        try:
            return fn(*a, **kw)
        except (MembershipError, ShardMapError, ClusterError, PlanError) as e:
            _die(str(e))
    return wrapper


_start_option = click.option("--start/--no-start", default=True, show_default=True,
                             help="start the new node on this machine (local clusters); with --no-start, "
                                  "start it yourself: raftkv serve --config FILE --node NAME")
_timeout_option = click.option("--timeout", default=30.0, show_default=True, help="seconds per step")


@node_group.command("add")
@click.argument("address", metavar="HOST:CLIENT_PORT")
@click.option("--name", default=None, help="node name (default: the next free nN)")
@click.option("--raft-port", type=int, default=None, help="first Raft port (default: a free block)")
@click.option("--empty", is_flag=True,
              help="join no shard group: 'raftkv rebalance' then moves replicas onto the node")
@_start_option
@_timeout_option
@cluster_option
@_membership_errors
def node_add(address: str, name: str | None, raft_port: int | None, empty: bool, start: bool, timeout: float,
             cluster_file: str | None) -> None:
    """Add a node at ADDRESS to every shard group (replication grows by one), or with --empty to none."""
    op = _operator(cluster_file, timeout)
    added = op.add(address, name=name, raft_port=raft_port, start=start, join=not empty)
    click.echo(f"added {added}: member of shards {op.map.shards_on(added)} (epoch {op.map.epoch})")


@node_group.command("remove")
@click.argument("name")
@click.option("--stop/--no-stop", default=True, show_default=True, help="stop the node afterwards (local)")
@click.option("--drain/--no-drain", default=True, show_default=True,
              help="move its replicas to the other nodes first when they can hold them all")
@_timeout_option
@cluster_option
@_membership_errors
def node_remove(name: str, stop: bool, drain: bool, timeout: float, cluster_file: str | None) -> None:
    """Remove node NAME: its replicas move to the other nodes first when they can hold them all (the
    replication stays), else it leaves every shard group (replication shrinks by one)."""
    from raftkv.rebalance import Rebalancer

    op = _operator(cluster_file, timeout)
    Rebalancer(op, step_timeout=timeout, say=lambda msg: click.echo(msg)).remove_node(name, stop=stop, drain=drain)
    click.echo(f"removed {name} (epoch {op.map.epoch})")


@node_group.command("replace")
@click.argument("old")
@click.argument("address", metavar="HOST:CLIENT_PORT")
@click.option("--name", default=None, help="name of the new node (default: the next free nN)")
@click.option("--raft-port", type=int, default=None, help="first Raft port (default: a free block)")
@_start_option
@_timeout_option
@cluster_option
@_membership_errors
def node_replace(old: str, address: str, name: str | None, raft_port: int | None, start: bool, timeout: float,
                 cluster_file: str | None) -> None:
    """Replace node OLD (e.g. a dead machine) by a new, empty node at ADDRESS."""
    op = _operator(cluster_file, timeout)
    new = op.replace(old, address, name=name, raft_port=raft_port, start=start)
    click.echo(f"replaced {old} by {new}: member of shards {op.map.shards_on(new)} (epoch {op.map.epoch})")


@click.group("leaders")
def leaders_group() -> None:
    """Shard leadership."""


@leaders_group.command("balance")
@_timeout_option
@cluster_option
@_membership_errors
def leaders_balance(timeout: float, cluster_file: str | None) -> None:
    """Spread shard leaders evenly over the live nodes (Raft leadership transfer)."""
    op = _operator(cluster_file, timeout)
    moves = op.balance()
    leaders = op.leaders()
    counts: dict[str, int] = {}
    for n in leaders.values():
        if n is not None:
            counts[n] = counts.get(n, 0) + 1
    click.echo(f"{len(moves)} leadership move(s); leaders per node: "
               + ", ".join(f"{n}={counts.get(n, 0)}" for n in sorted(op.map.nodes)))


# -- scale-out: replica rebalancing (raftkv.rebalance) and plans (shards.plan) -----------------------

_NOT_BUILT = "nothing was changed ('raftkv shard add' adds one shard online, 'raftkv shard remove' removes the last)"


@click.command("rebalance")
@click.option("--dry-run", is_flag=True, help="print the replica moves; change nothing")
@click.option("--drain", multiple=True, metavar="NODE",
              help="move every replica off NODE (then 'raftkv node remove NODE'; repeatable)")
@click.option("--replication", type=int, default=None,
              help="replicas per shard wanted [default: min(3, nodes left)]")
@click.option("--timeout", default=120.0, show_default=True,
              help="seconds a step may wait (for a caught-up majority, a leader, a new replica to catch up)")
@cluster_option
@_membership_errors
def rebalance_cmd(dry_run: bool, drain: tuple[str, ...], replication: int | None, timeout: float,
                  cluster_file: str | None) -> None:
    """Move replicas, online, until each shard is on REPLICATION nodes, evenly.

    Every node ends within one replica of the mean. Each move adds the new replica,
    waits until it has caught up, and only then removes the old one, so no shard drops
    below REPLICATION replicas (or below what it has, if fewer) along the way. Safe to
    run again after a failure: the plan is made again from the cluster as it is.
    """
    from raftkv.rebalance import Rebalancer

    path = cluster_path(cluster_file)
    op = _operator(path, timeout)
    if op.map.adding is not None:
        _die(f"{path}: shard {op.map.adding} is being added; finish that first ('raftkv shard add')")
    if op.map.removing is not None:
        _die(f"{path}: shard {op.map.removing} is being removed; finish that first "
             f"('raftkv shard remove {op.map.removing}')")
    rb = Rebalancer(op, step_timeout=timeout, say=lambda msg: click.echo(msg))
    if not dry_run:
        rb.reconcile()
    plan = rb.plan(drain, replication)
    m = op.map
    drains = f", draining {', '.join(plan.drained)}" if plan.drained else ""
    click.echo(f"{path} (epoch {m.epoch}): {m.nshards} shard(s) on {len(plan.nodes)} node(s){drains}, "
               f"replication {m.replication} -> {plan.replication}")
    for line in plan.describe():
        click.echo(line)
    if dry_run:
        click.echo("dry run: nothing was changed")
        return
    result = rb.run(drain, replication)
    loads = ", ".join(f"{n}={len(op.map.shards_on(n))}" for n in sorted(op.map.nodes))
    click.echo(f"done: {len(result.step_seconds)} step(s) in {result.seconds:.1f} s, "
               f"{result.leader_moves} leadership move(s); replicas per node: {loads} (epoch {op.map.epoch})")


@click.group("shard")
def shard_group() -> None:
    """Shards of the ring: add one or remove the last, online (the keys move), or plan an add/remove."""


def _move_options(f: Any) -> Any:
    """The options ``shard add`` and ``shard remove`` share: how long a step waits, and how the keys are copied
    while they are served."""
    for option in reversed((
        click.option("--timeout", default=120.0, show_default=True,
                     help="seconds a step may wait (a leader, transactions holding moving keys)"),
        click.option("--chunk", type=click.IntRange(1), default=None,
                     help="keys copied (or deleted) per Raft entry while they are served (default 100; smaller: "
                          "lower client latency during the move, longer move)"),
        click.option("--pace", default=0.5, show_default=True, type=click.FloatRange(0.05, 1.0),
                     help="the pre-copy and the cleanup keep the cluster busy at most this fraction of the time, "
                          "resting between chunks (1: no rest, the fastest move; clients' latency against the "
                          "move's length)"),
        click.option("--depth", type=click.IntRange(1, 16), default=None,
                     help="chunks of one source's pre-copy being installed at once (default 1)"),
    )):
        f = option(f)
    return f


def _resharder(cluster_file: str | None, timeout: float, chunk: int | None, pace: float, depth: int | None) -> Any:
    from raftkv.progress import ProgressLine
    from raftkv.resharder import CHUNK_KEYS, PRECOPY_DEPTH, Resharder

    op = _operator(cluster_path(cluster_file), timeout)
    # How far each source's copy and clean-up have come: a line redrawn on a terminal, one every 10 s in a log
    # (stderr); erased before each message the command prints.
    line = ProgressLine(click.get_text_stream("stderr"))

    def say(msg: str) -> None:
        line.end()
        click.echo(msg)

    return Resharder(op, step_timeout=timeout, chunk=chunk or CHUNK_KEYS, say=say, pace=pace,
                     depth=depth or PRECOPY_DEPTH, progress=line)


@shard_group.command("add")
@_move_options
@cluster_option
@_membership_errors
def shard_add(timeout: float, chunk: int | None, pace: float, depth: int | None, cluster_file: str | None) -> None:
    """Add shard N (N = the shard count) online and move to it the keys the new ring gives it.

    The cluster serves throughout: writes of moving keys wait (-MOVING) while they are copied,
    then every node and client is sent to the new shard (-WRONGSHARD, a newer map). Safe to run
    again after a failure: it finishes the add that stopped (docs/scale-out.md).
    """
    resharder = _resharder(cluster_file, timeout, chunk, pace, depth)
    n = resharder.op.map.nshards
    result = resharder.run()
    steps = ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
    if result.total:
        click.echo(f"moved {result.moved} of {result.total} keys to shard {result.shard} "
                   f"({result.fraction:.2%}; an even share 1/{n + 1} = {1 / (n + 1):.2%}); "
                   f"{result.purged} deleted from the sources; {steps} (epoch {result.epoch})")
    else:
        click.echo(f"shard {result.shard} added (epoch {result.epoch}); {result.purged} moved keys deleted from "
                   f"the sources; {steps}")


@shard_group.command("remove")
@click.argument("shard_id", metavar="[ID]", type=int, required=False)
@_move_options
@cluster_option
@_membership_errors
def shard_remove(shard_id: int | None, timeout: float, chunk: int | None, pace: float, depth: int | None,
                 cluster_file: str | None) -> None:
    """Remove the last shard (ID: it, default the last) online, moving its keys to the others.

    Only the last shard can go: shard ids stay 0..N-2. Every key of it moves to the shard the ring
    without it gives it; no other key changes shard. The cluster serves throughout: writes of its
    keys wait (-MOVING) while they are copied. Safe to run again after a failure, with the same ID:
    it finishes the removal that stopped, or says it is done (docs/scale-out.md).
    """
    resharder = _resharder(cluster_file, timeout, chunk, pace, depth)
    n = resharder.op.map.nshards
    result = resharder.remove(shard_id)
    steps = ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
    if result.total:
        click.echo(f"moved {result.moved} of {result.total} keys off shard {result.shard} "
                   f"({result.moved / max(1, result.total):.0%} of its keys; it held about 1/{n} of the ring); "
                   f"{steps} (epoch {result.epoch})")
    else:
        click.echo(f"shard {result.shard} removed (epoch {result.epoch}); {steps}")


@shard_group.command("plan")
@click.argument("action", type=click.Choice(["add", "remove"]))
@click.argument("shard_id", metavar="[ID]", type=int, required=False)
@click.option("--count", default=1, show_default=True, help="add: how many shards, ID on (remove: 1 only)")
@click.option("--arcs", "list_arcs", is_flag=True, help="also list every moving hash range")
@cluster_option
@_membership_errors
def shard_plan(action: str, shard_id: int | None, count: int, list_arcs: bool,
               cluster_file: str | None) -> None:
    """Print which ring arcs (key hash ranges) would move if shard ID were added or removed.

    ID defaults to the next shard id (add) or the last one (remove): the ids a
    shard map, which numbers shards 0..shards-1, can add or remove. With --count N,
    add plans shards ID..ID+N-1 at once.
    """
    from shards.plan import plan_shard_add, plan_shard_remove
    from shards.shardmap import ShardMap

    if action == "remove" and count != 1:
        _die("shard plan remove takes one shard at a time (--count 1)")
    path = cluster_path(cluster_file)
    m = ShardMap.load(path)
    if action == "add":
        movement = plan_shard_add(m.ring, shard_id, count)
    else:
        movement = plan_shard_remove(m.ring, shard_id)
    changed = ", ".join(map(str, sorted(set(movement.old.shards) ^ set(movement.new.shards))))
    click.echo(f"{path} (epoch {m.epoch}): {action} shard{'s' * (count > 1)} {changed}: "
               f"shards 0..{m.nshards - 1} -> {len(movement.new)} shard(s), {m.vnodes} vnodes each")
    for line in movement.describe(list_arcs):
        click.echo(line)
    click.echo(f"plan only: {_NOT_BUILT}")


# -- users and roles (raftkv.acl; RAFTKV.USER / RAFTKV.ROLE) ---------------------------------------

def _acl_command(cluster_file: str | None, *args: str | bytes) -> object:
    from raftkv.client import Client, RaftKVError

    with Client(cluster=cluster_path(cluster_file), **client_kw()) as c:
        try:
            return c.command(*args)
        except RaftKVError as e:
            _die(str(e))
    return None


@click.group("user")
def user_group() -> None:
    """Users: passwords (stored as salted scrypt hashes) and roles; replicated in the cluster."""


@user_group.command("add")
@click.argument("name")
@click.option("--password", prompt=True, hide_input=True, confirmation_prompt=True)
@click.option("--role", "roles", multiple=True, help="a role to grant (repeatable); 'root' grants everything")
@cluster_option
def user_add(name: str, password: str, roles: tuple[str, ...], cluster_file: str | None) -> None:
    """Create (or replace) user NAME."""
    _acl_command(cluster_file, "RAFTKV.USER", "ADD", name, password, *roles)
    click.echo(f"user {name}: roles {', '.join(roles) or '-'}")


def _acl_verb(group: click.Group, verb: str, command: str, args: tuple[str, ...], doc: str, said: str) -> None:
    """Add ``group verb ARGS...``: one RAFTKV.USER/ROLE action whose arguments are the ARGS, in order."""

    def run(cluster_file: str | None, **kw: str) -> None:
        _acl_command(cluster_file, command, verb.upper(), *(kw[a] for a in args))
        click.echo(said.format(**kw))

    run.__doc__ = doc
    fn = cluster_option(run)
    for a in reversed(args):
        fn = click.argument(a)(fn)
    group.command(verb)(fn)


_acl_verb(user_group, "del", "RAFTKV.USER", ("name",), "Delete user NAME.", "deleted user {name}")
_acl_verb(user_group, "grant", "RAFTKV.USER", ("name", "role"), "Grant ROLE to user NAME.", "granted {role} to {name}")
_acl_verb(user_group, "revoke", "RAFTKV.USER", ("name", "role"),
          "Revoke ROLE from user NAME (effective on open connections too).", "revoked {role} from {name}")


@user_group.command("list")
@cluster_option
def user_list(cluster_file: str | None) -> None:
    """Users and their roles."""
    for name, roles in _acl_command(cluster_file, "RAFTKV.USER", "LIST") or []:  # type: ignore[union-attr]
        click.echo(f"{name.decode()}\t{', '.join(r.decode() for r in roles) or '-'}")


@click.group("role")
def role_group() -> None:
    """Roles: command categories (read, write, txn, admin) and key prefixes to read and write."""


@role_group.command("set")
@click.argument("name")
@click.option("--category", "categories", multiple=True, type=click.Choice(["read", "write", "txn", "admin"]))
@click.option("--read", "read", multiple=True, help="key prefix the role may read (repeatable; '' = all)")
@click.option("--write", "write", multiple=True, help="key prefix the role may write (repeatable; '' = all)")
@cluster_option
def role_set(name: str, categories: tuple[str, ...], read: tuple[str, ...], write: tuple[str, ...],
             cluster_file: str | None) -> None:
    """Create (or replace) role NAME."""
    _acl_command(cluster_file, "RAFTKV.ROLE", "SET", name, "CATEGORIES", ",".join(categories),
                 "READ", *read, "WRITE", *write)
    click.echo(f"role {name}: {', '.join(categories) or 'no categories'}; read {list(read)}; write {list(write)}")


_acl_verb(role_group, "del", "RAFTKV.ROLE", ("name",), "Delete role NAME (and revoke it from every user).",
          "deleted role {name}")


@role_group.command("list")
@cluster_option
def role_list(cluster_file: str | None) -> None:
    """Roles and their grants."""
    for name, cats, read, write in _acl_command(cluster_file, "RAFTKV.ROLE", "LIST") or []:  # type: ignore[union-attr]
        click.echo(f"{name.decode()}\tcategories={','.join(c.decode() for c in cats) or '-'}\t"
                   f"read={[p.decode(errors='replace') for p in read]}\twrite={[p.decode(errors='replace') for p in write]}")


def register(main: click.Group) -> None:
    """Add the operations commands to the ``raftkv`` group."""
    main.add_command(user_group)
    main.add_command(role_group)
    main.add_command(backup_cmd)
    main.add_command(restore_cmd)
    main.add_command(node_group)
    main.add_command(leaders_group)
    main.add_command(rebalance_cmd)
    main.add_command(shard_group)
