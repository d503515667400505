"""Operations commands of the ``raftkv`` CLI: backup, restore, node add/remove/replace, leaders balance.

``raftkv.cli`` calls ``register(main)``; the commands live here so the main CLI
module stays small.  Exit status: 0 success, 2 error (the message says why).
"""

from __future__ import annotations

import json
import os
import sys

import click


def _cluster_path(cluster_file: str | None) -> str:
    from raftkv.cluster import DEFAULT_DIR

    path = cluster_file or os.path.join(DEFAULT_DIR, "cluster.toml")
    if not os.path.exists(path):
        raise click.ClickException(
            f"no cluster file at {path}: start one with 'raftkv cluster up' or pass --cluster FILE")
    return path


def _die(msg: str) -> None:
    click.echo(f"raftkv: error: {msg}", err=True)
    sys.exit(2)


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
    """
    from raftkv.backup import BackupError, take_backup
    from raftkv.client import Client

    with Client(cluster=_cluster_path(cluster_file), timeout=timeout) as c:
        try:
            hdr = take_backup(c, file, fence_ttl_s=fence_ttl, log=lambda m: click.echo(m, err=True))
        except BackupError as e:
            _die(str(e))
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


def register(main: click.Group) -> None:
    """Add the operations commands to the ``raftkv`` group."""
    main.add_command(backup_cmd)
    main.add_command(restore_cmd)
