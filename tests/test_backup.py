"""Online backup and restore: consistent under concurrent writes and transactions; bad files refused."""

from __future__ import annotations

import hashlib
import json
import struct
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from raftkv import Client, IndeterminateError, RaftKVError
from raftkv.backup import MAGIC, BackupError, check_shard, map_move, read_backup, restore, take_backup
from raftkv.cluster import LocalCluster
from raftkv.server import rpc
from shards.shardmap import local_cluster

from .conftest import PutWriter, dump_logs, start_cluster, unique_keys


class MsetWriter(threading.Thread):
    """Cross-shard MSETs of fresh key groups (one key per shard, same value); records acked groups."""

    def __init__(self, lc: LocalCluster, prefix: str) -> None:
        super().__init__(daemon=True)
        self.map = lc.map
        self.client = Client(cluster=lc.config, timeout=10.0)
        self.prefix = prefix
        self.acked: list[tuple[list[str], float]] = []
        self.tried: list[list[str]] = []
        self.stop = threading.Event()

    def group(self, i: int) -> list[str]:
        out: dict[int, str] = {}
        j = 0
        while len(out) < self.map.nshards:
            k = f"{self.prefix}-{i}-{j}"
            out.setdefault(self.map.shard_for_key(k), k)
            j += 1
        return list(out.values())

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            keys = self.group(i)
            i += 1
            self.tried.append(keys)
            try:
                self.client.mset({k: f"g{i}" for k in keys})
                self.acked.append((keys, time.monotonic()))
            except (IndeterminateError, RaftKVError):
                pass


@pytest.fixture
def busy_cluster(tmp_path: Path):
    lc = start_cluster(str(tmp_path / "c"))
    yield lc
    lc.stop()


def test_backup_under_load_restores_acked_writes_and_no_partial_transaction(busy_cluster: LocalCluster,
                                                                               tmp_path: Path) -> None:
    lc = busy_cluster
    puts = [PutWriter(lc.config, unique_keys(f"p{i}")) for i in range(2)]
    msets = [MsetWriter(lc, f"m{i}") for i in range(2)]
    for w in puts + msets:
        w.start()
    try:
        # Load first: enough puts and MSETs acknowledged for the checks below (more than 20 and 3).
        deadline = time.monotonic() + 60
        while sum(len(w.acked) for w in puts) <= 20 or sum(len(w.acked) for w in msets) <= 3:
            assert time.monotonic() < deadline, "too few writes acknowledged in 60 s before the backup"
            time.sleep(0.05)
        started = time.monotonic()
        with Client(cluster=lc.config, timeout=30.0) as c:
            header = take_backup(c, tmp_path / "b1.rkvb")
        time.sleep(0.5)
    finally:
        for w in puts + msets:
            w.stop.set()
        for w in puts + msets:
            w.join(30)
    bk = read_backup(tmp_path / "b1.rkvb")
    assert bk.header["key_count"] == header["key_count"] == sum(len(r) for _, r in bk.shards.values())
    data = {k: v for _, rows in bk.shards.values() for k, v, _ in rows}
    # every write acknowledged before the backup started is in it
    before = [k for w in puts for k, _, acked in w.acked if acked < started]
    assert len(before) > 20
    assert [k for k in before if data.get(k.encode()) != k.encode()] == []
    mset_before = [keys for w in msets for keys, t in w.acked if t < started]
    assert len(mset_before) > 3
    assert [ks for ks in mset_before if not all(k.encode() in data for k in ks)] == []
    # no transaction is half in the backup (every group: all keys, one value, or none)
    partial = []
    for w in msets:
        for keys in w.tried:
            present = [data.get(k.encode()) for k in keys]
            if any(v is not None for v in present) and (None in present or len(set(present)) != 1):
                partial.append((keys, present))
    assert partial == []
    print(f"backup: {len(data)} keys; {len(before)} puts and {len(mset_before)} msets acked before it; "
          f"{sum(len(w.acked) for w in puts + msets)} writes acked in all")
    for w in puts:  # on the live cluster: acked writes kept, failed ones absent
        print("puts under backup:", w.check(lc.config))

    # restore into a new cluster and read everything back through it
    new = restore(tmp_path / "b1.rkvb", tmp_path / "restored", keep_running=True)
    try:
        with Client(cluster=new.config, timeout=30.0) as c:
            sample = sorted(data)[:: max(1, len(data) // 300)]
            assert [k for k in sample if c.get(k) != data[k]] == []
            c.put("after-restore", "x")  # the restored cluster takes writes
            assert c.get("after-restore") == b"x"
        # revisions are kept: a shard's revision counter never goes back
        for s, (rev, _rows) in bk.shards.items():
            st = json.loads(Client(cluster=new.config)._call_node(
                new.map.nodes["n1"].client_addr, [b"RAFTKV.STATUS"], 5.0))
            assert st["shards"][str(s)]["revision"] >= rev
    except Exception:
        dump_logs(new)
        raise
    finally:
        new.stop()


def _rewrite(path: Path, out: Path, edit) -> None:
    blob = path.read_bytes()
    (hlen,) = struct.unpack_from(">I", blob, len(MAGIC))
    hstart = len(MAGIC) + 4
    header = json.loads(blob[hstart:hstart + hlen])
    edit(header)
    head = json.dumps(header).encode()
    body = blob[hstart + hlen:-32]
    raw = MAGIC + struct.pack(">I", len(head)) + head + body
    out.write_bytes(raw + hashlib.sha256(raw).digest())


def test_corrupt_truncated_and_mismatched_backups_are_refused(cluster: LocalCluster, tmp_path: Path) -> None:
    with Client(cluster=cluster.config, timeout=20.0) as c:
        for i in range(50):
            c.put(f"bk-{i}", f"v{i}")
        take_backup(c, tmp_path / "good")
    good = tmp_path / "good"
    assert read_backup(good).header["key_count"] >= 50

    blob = bytearray(good.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (tmp_path / "corrupt").write_bytes(bytes(blob))
    with pytest.raises(BackupError, match="checksum mismatch"):
        read_backup(tmp_path / "corrupt")

    (tmp_path / "short").write_bytes(good.read_bytes()[:-100])
    with pytest.raises(BackupError, match="truncated"):
        read_backup(tmp_path / "short")

    (tmp_path / "junk").write_bytes(b"hello world, not a backup at all" * 4)
    with pytest.raises(BackupError, match="not a raftkv backup"):
        read_backup(tmp_path / "junk")

    _rewrite(good, tmp_path / "v99", lambda h: h.update(version=99))
    with pytest.raises(BackupError, match="version 99 is not supported"):
        read_backup(tmp_path / "v99")

    other = local_cluster(3, 2, base_port=41000, data_dir=str(tmp_path / "o" / "data"))
    other.save(tmp_path / "other.toml")
    with pytest.raises(BackupError, match="mismatch"):
        restore(good, tmp_path / "o", config=str(tmp_path / "other.toml"))

    # the CLI says so and exits 2
    from click.testing import CliRunner

    from raftkv.cli import main

    r = CliRunner().invoke(main, ["restore", str(tmp_path / "corrupt"), "--dir", str(tmp_path / "x")])
    assert r.exit_code == 2 and "checksum mismatch" in r.output
    r = CliRunner().invoke(main, ["restore", str(good), "--check"])
    assert r.exit_code == 0 and "OK" in r.output


def test_a_backup_is_refused_unless_every_shard_was_fenced_and_dumped_under_the_maps_ring(tmp_path: Path) -> None:
    m = local_cluster(3, 2, base_port=41000, data_dir=str(tmp_path / "data"))
    up = [1, 0, 5, 9, 1]  # fence up, nothing prepared, 5 keys, revision 9, no move started or ended since
    check_shard(0, [*up, 2, m.vnodes], m, 60)  # serves the map's ring
    check_shard(0, [*up, 0, 0], m, 60)  # never took part in a move: the map's ring is its own
    for reply, says in (([*up, 3, m.vnodes], "serves a ring of 3 shards"),  # an add ended before it was fenced
                        ([1, 0, 5, 9, 0, 2, m.vnodes], "a shard move started or ended on it during the backup"),
                        ([0, 0, 5, 9, 0, 2, m.vnodes], "fence lapsed"),
                        ([1, 0, 5, 9], "older raftkv")):
        with pytest.raises(BackupError, match=says):
            check_shard(0, reply, m, 60)
    assert map_move(m) is None
    adding = SimpleNamespace(adding=2, removing=None, epoch=4)
    assert "shard 2 is being added (map epoch 4)" in map_move(adding)
    assert "run 'raftkv shard remove 1' again" in map_move(SimpleNamespace(adding=None, removing=1, epoch=4))


def _reshard(c: Client, shard: int, *cmd) -> object:
    """One ``mv_*`` state-machine command on ``shard``'s leader (what ``raftkv shard add`` sends)."""
    return rpc.decode(c._request(shard, [b"RAFTKV.RESHARD", str(shard).encode(), rpc.encode(cmd)], write=False))


class MoveStartsDuring:
    """A client whose backup meets a shard move: shard 0 starts giving keys away just before the first
    ``RAFTKV.BACKUP <step>`` (after every fence went up)."""

    def __init__(self, client: Client, step: bytes, move: tuple) -> None:
        self.client, self.step, self.move = client, step, move
        self.started = False

    def __getattr__(self, name: str) -> object:
        return getattr(self.client, name)

    def _request(self, shard: int, args: list[bytes], write: bool, **kw) -> object:
        if args[:2] == [b"RAFTKV.BACKUP", self.step] and not self.started:
            self.started = True
            assert _reshard(self.client, 0, *self.move) == "copying"
        return self.client._request(shard, args, write, **kw)


def test_a_backup_during_a_shard_move_is_refused_or_discarded_never_written(cluster: LocalCluster,
                                                                            tmp_path: Path) -> None:
    from click.testing import CliRunner

    from raftkv.cli import main

    n, vnodes = cluster.map.nshards, cluster.map.vnodes
    move = ("mv_precopy", 1000, 0, n, vnodes)  # shard 0 starts a move of its keys to a new shard n
    with Client(cluster=cluster.config, timeout=20.0) as c:
        for i in range(30):
            c.put(f"mv-{i}", f"v{i}")
        # a move under way when the backup starts: refused at the fence, retryable (the CLI exits 75)
        assert _reshard(c, 0, *move) == "copying"
        try:
            with pytest.raises(BackupError, match="shard 0: a shard move is under way") as err:
                take_backup(c, tmp_path / "b")
            assert err.value.retryable and not (tmp_path / "b").exists()
            r = CliRunner().invoke(main, ["backup", str(tmp_path / "b"), "--cluster", str(cluster.config)])
            assert r.exit_code == 75 and "run the backup after the move" in r.output
        finally:
            assert _reshard(c, 0, "mv_abort", 1000) == "aborted"
        # a move that starts after the fences went up: the dump or the final check notices, nothing written
        for step, says in ((b"DUMP", "started or ended here since backup fence"),
                           (b"CHECK", "started or ended on it during the backup")):
            try:
                with pytest.raises(BackupError, match=says) as err:
                    take_backup(MoveStartsDuring(c, step, move), tmp_path / "b")
                assert err.value.retryable and not (tmp_path / "b").exists()
            finally:
                assert _reshard(c, 0, "mv_abort", 1000) == "aborted"
        # no move: the backup is taken, every key in it once
        header = take_backup(c, tmp_path / "b")
        rows = [k for _, shard_rows in read_backup(tmp_path / "b").shards.values() for k, _, _ in shard_rows]
        assert len(rows) == len(set(rows)) == header["key_count"] and b"mv-7" in rows
