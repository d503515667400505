"""``raftkv shard add`` on real node processes: keys move to the new shard while clients write and read.

3 nodes, 2 shards, a few thousand keys loaded, then shard 2 is added while client threads keep
overwriting keys (session writes through ``raftkv.Client``) and reading each one back right after
its write. Afterwards: every acknowledged write's value is the one read, every read during the move
saw its thread's own latest write (no stale read), no key is stored on two shards (the shards' key
counts add up to the number of distinct keys, every one of which is readable), the moved fraction
is within 1.25x of 1/3, and every shard's replicas hold the same data (HASHKV).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from raftkv import Client
from raftkv.aio import AsyncClient
from raftkv.cluster import LocalCluster, call
from raftkv.errors import IndeterminateError, LockTimeout, RaftKVError
from raftkv.membership import Operator
from raftkv.progress import Progress
from raftkv.resharder import Resharder, ReshardError
from raftkv.state import STATE_MACHINE_VERSION
from shards.ring import DEFAULT_VNODES, Ring
from shards.shardmap import ShardMap

from .conftest import dump_logs, replicas_agree, start_cluster

LOADED = 3000


class Overwriter(threading.Thread):
    """Overwrites its own keys with increasing values (session PUTs, and every fourth time an MSET of two
    keys) and reads each back at once.

    ``last[key]``: the value of the newest acknowledged write; ``maybe[key]``: values whose write
    ended unknown (the key may hold one of them instead, if it was written after the last ack).
    ``stale``: reads that did not return the value this thread had just written.
    """

    def __init__(self, cluster_file: str, keys: list[str], seed: int) -> None:
        super().__init__(daemon=True)
        self.client = Client(cluster=cluster_file, timeout=15.0)
        self.keys = keys
        self.rng = random.Random(seed)
        self.last: dict[str, bytes] = {}
        self.maybe: dict[str, list[bytes]] = {}
        self.stale: list[tuple[str, bytes, bytes | None]] = []
        self.errors: list[str] = []
        self.writes = 0
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            self._run()
        except BaseException as e:  # a thread that dies must fail the test, not just stop writing
            self.errors.append(f"writer crashed: {type(e).__name__}: {e}")
            self.client.close()

    def _run(self) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            # every fourth write is an MSET of two keys (a transaction, across shards when they differ)
            batch = {k: f"{k}:{i}".encode() for k in self.rng.sample(self.keys, 2 if i % 4 == 0 else 1)}
            try:
                if len(batch) == 1:
                    self.client.put(*next(iter(batch.items())))
                else:
                    self.client.mset(batch)
            except IndeterminateError:
                for key, value in batch.items():
                    self.maybe.setdefault(key, []).append(value)
                continue
            except RaftKVError as e:
                self.errors.append(f"write {list(batch)}: {e}")
                continue
            for key, value in batch.items():
                self.last[key] = value
                self.maybe.pop(key, None)
            self.writes += 1
            for key, value in batch.items():
                try:
                    got = self.client.get(key)
                except RaftKVError as e:
                    self.errors.append(f"get {key}: {e}")
                    continue
                if got != value:
                    self.stale.append((key, value, got))
        self.client.close()


def _shard_key_counts(m: ShardMap) -> dict[int, int]:
    """Keys each shard's leader holds (moved-away keys not yet deleted included)."""
    import json

    counts: dict[int, int] = {}
    for info in m.nodes.values():
        st = json.loads(call(info.client_addr, "RAFTKV.STATUS", timeout=5.0))
        for s, sh in st["shards"].items():
            if sh["role"] == "leader":
                # every shard took part in the move, which is over: no move left, each owns its part of the ring
                assert (sh["move"], sh["ring_shards"]) == (None, m.nshards), (info.name, s, sh)
                counts[int(s)] = sh["keys"]
    return counts


def _load(lc: LocalCluster) -> list[str]:
    keys = [f"key-{i}" for i in range(LOADED)]
    with Client(cluster=lc.config, timeout=15.0) as c:
        for i in range(0, LOADED, 500):
            c.mset({k: f"{k}:0" for k in keys[i:i + 500]})
    return keys


def _start_writers(lc: LocalCluster, keys: list[str], count: int = 3) -> list[Overwriter]:
    writers = [Overwriter(str(lc.config), keys[i::count], seed=i) for i in range(count)]
    for w in writers:
        w.start()
    return writers


def _stop(writers: list[Overwriter]) -> None:
    for w in writers:
        w.stop.set()
    for w in writers:
        w.join(30)


def _check_after_add(lc: LocalCluster, keys: list[str], writers: list[Overwriter], shards: int) -> None:
    """Every acknowledged write readable, no stale read, each key stored once, replicas agree."""
    m = ShardMap.load(lc.config)
    assert (m.nshards, m.adding) == (shards, None)
    stale = [s for w in writers for s in w.stale]
    assert stale == [], f"reads that missed their own thread's acknowledged write: {stale[:5]}"
    errors = [e for w in writers for e in w.errors]
    assert errors == [], f"errors surfaced to the clients: {errors[:5]}"
    assert all(w.writes > 0 for w in writers), [w.writes for w in writers]
    with Client(cluster=lc.config, timeout=15.0) as c:
        values = c.mget(keys)
    expected: dict[str, bytes] = {k: f"{k}:0".encode() for k in keys}
    maybe: dict[str, list[bytes]] = {}
    for w in writers:
        expected.update(w.last)
        for k, vs in w.maybe.items():
            maybe.setdefault(k, []).extend(vs)
    wrong = [(k, v) for k, v in zip(keys, values, strict=True) if v != expected[k] and v not in maybe.get(k, [])]
    assert wrong == [], f"{len(wrong)} keys do not hold their latest acknowledged write: {wrong[:5]}"
    counts = _shard_key_counts(m)
    assert sorted(counts) == list(range(shards))
    # every key is readable (above), so the counts adding up to the number of keys means none is stored twice
    assert sum(counts.values()) == len(keys), f"a key is stored on two shards: {counts}"
    for s in range(shards):
        replicas_agree(m, s)


@contextlib.contextmanager
def _loaded_under_writes(tmp_path: Path, shards: int, count: int = 2,
                         settle: float = 0.5) -> Iterator[tuple[LocalCluster, list[str], list[Overwriter]]]:
    """3 nodes x ``shards`` shards, ``LOADED`` keys, ``count`` writer threads running for ``settle`` s: yields
    ``(cluster, keys, writers)``; on a failure stops the writers and dumps the logs; stops the cluster."""
    lc = start_cluster(str(tmp_path / "c"), nodes=3, shards=shards)
    writers: list[Overwriter] = []
    try:
        keys = _load(lc)
        writers = _start_writers(lc, keys, count=count)
        time.sleep(settle)
        yield lc, keys, writers
    except BaseException:
        _stop(writers)
        dump_logs(LocalCluster(lc.dir))
        raise
    finally:
        lc.stop()


def test_shard_add_moves_keys_under_writes_and_reads(tmp_path: Path) -> None:
    with _loaded_under_writes(tmp_path, shards=2, count=3, settle=1.0) as (lc, keys, writers):
        op = Operator(lc.config, timeout=30.0, say=print)
        reports: list[Progress] = []
        result = Resharder(op, step_timeout=60.0, say=print, progress=reports.append).run()
        time.sleep(1.0)
        _stop(writers)
        share = 1 / 3
        # progress after every chunk: each source's copy, then each source's clean-up, counted up to the end
        last = {p.what: p for p in reports}
        copies = {w: p for w, p in last.items() if "->" in w}
        assert sorted(copies) == ["shard 0 -> shard 2", "shard 1 -> shard 2"]
        assert sum(p.done for p in copies.values()) >= result.moved  # (plus keys written since, replayed later)
        for p in copies.values():  # the estimate: the source's keys times its share of the ring that moves
            assert p.total is not None and 0.5 * p.done <= p.total <= 1.5 * p.done and p.nbytes > 0
        deletes = [p for w, p in last.items() if w.endswith("deleting moved keys")]
        assert sum(p.done for p in deletes) == result.purged
        print(f"moved {result.moved} of {result.total} keys: {result.fraction:.4f} (1/3 = {share:.4f}); "
              f"steps {result.seconds}; writes during the run: {[w.writes for w in writers]}")
        assert result.shard == 2 and result.total == LOADED
        assert share / 1.25 <= result.fraction <= share * 1.25
        # the keys moved are exactly the ones the new ring gives shard 2, and they left the sources
        assert result.moved == sum(1 for k in keys if Ring(range(3), DEFAULT_VNODES).shard_for(k) == 2)
        assert result.purged == result.moved
        _check_after_add(lc, keys, writers, 3)


def test_no_key_moves_while_a_node_runs_another_state_machine_version(tmp_path: Path) -> None:
    """A rolling upgrade under way (one node reporting another state machine version, then one reporting none,
    as a node older than the field does): `shard add` and `shard remove` refuse before changing anything."""
    lc = start_cluster(str(tmp_path / "c"), nodes=3, shards=2)
    try:
        with Client(cluster=lc.config, timeout=15.0) as c:
            c.put("k", "v")
        epoch = lc.map.epoch
        v = STATE_MACHINE_VERSION
        for fault, remove, expect in ((str(v + 1), False, f"n1: {v}, n2: {v}, n3: {v + 1}"),
                                      ("-1", True, "n3 report no")):
            lc.stop_node("n3")
            lc.node_args = ["--fault", f"status.state_machine_version:{fault}"]
            lc.start_node("n3")
            lc.node_args = []
            lc.wait_ready(60, nodes=["n3"])  # reads through n3: it answers (an unreachable node is not checked)
            op = Operator(lc.config, timeout=30.0, say=print)
            rs = Resharder(op, step_timeout=30.0, say=print)
            with pytest.raises(ReshardError, match=expect):
                rs.remove() if remove else rs.run()
            m = ShardMap.load(lc.config)
            assert (m.epoch, m.nshards, m.adding, m.removing) == (epoch, 2, None, None)
        with Client(cluster=lc.config, timeout=15.0) as c:
            assert c.get("k") == b"v"
    except BaseException:
        dump_logs(lc)
        raise
    finally:
        lc.stop()


def test_a_client_with_the_old_map_is_redirected_and_succeeds(tmp_path: Path) -> None:
    """Between the hand-off and the new map, a moved key answers -WRONGSHARD; the client holding the map
    of before the add refreshes it, retries, and its write succeeds once the map is out. (Values of
    300 KiB move too, several copy chunks of them.)"""
    lc = start_cluster(str(tmp_path / "c"), nodes=3, shards=2)
    try:
        old = ShardMap.load(lc.config)
        new_ring = Ring(range(3), old.vnodes)
        key, aio_key, txn_key = [k for k in (f"moved-{i}" for i in range(1000)) if new_ring.shard_for(k) == 2][:3]
        stay_key = next(k for k in (f"stay-{i}" for i in range(1000)) if new_ring.shard_for(k) == 0)
        # large values too: a copy chunk holds at most 1 MiB of them, under the node's 1.5 MiB request limit
        big = {f"big-{i}": bytes([i]) * (300 * 1024) for i in range(24)}
        with Client(cluster=lc.config, timeout=15.0) as c:
            c.put(key, "before")
            for k, v in big.items():
                c.put(k, v)
        client = Client(cluster=old, timeout=20.0)
        reloads: list[int] = []
        reload = client._reload_map

        def counting_reload() -> None:
            reloads.append(client.map.epoch)  # type: ignore[union-attr]
            reload()
        client._reload_map = counting_reload  # type: ignore[method-assign]
        outcome: list[object] = []
        aio_outcome: list[object] = []
        txn_outcome: list[object] = []

        async def aio_put() -> None:  # the asyncio client, with the old map as well
            async with AsyncClient(cluster=old, timeout=20.0) as ac:
                await ac.put(aio_key, "after")
                aio_outcome.append(ac.map.epoch)  # type: ignore[union-attr]

        def say(msg: str) -> None:
            print(msg)
            if "puts it on the ring" in msg:  # handed off and open, the map not out yet
                writer = threading.Thread(target=lambda: outcome.append(client.put(key, "after")), daemon=True)
                writer.start()
                threading.Thread(target=lambda: asyncio.run(aio_put()), daemon=True).start()
                # a transaction across a moved key and one that stays: its PREPARE at the source votes NO,
                # the coordinator answers -MOVING, the client retries it
                threading.Thread(target=lambda: txn_outcome.append(client.mset({txn_key: "t", stay_key: "t"})),
                                 daemon=True).start()
                time.sleep(3.5)  # the writes meet -WRONGSHARD (the MSET -MOVING) meanwhile, past MSET's 10 retries
                assert outcome == aio_outcome == txn_outcome == [], "a moved key was written before the new map"

        Resharder(Operator(lc.config, timeout=30.0, say=print), step_timeout=60.0, say=say).run()
        deadline = time.monotonic() + 20
        while not outcome and time.monotonic() < deadline:
            time.sleep(0.05)
        while not (aio_outcome and txn_outcome) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert txn_outcome == [None], txn_outcome
        assert outcome == [None], outcome  # put returns None: no error surfaced
        assert aio_outcome and aio_outcome[0] > old.epoch  # type: ignore[operator]  # it fetched a newer map
        assert reloads and reloads[0] == old.epoch  # it was told to refresh its map
        assert client.get(key) == b"after"
        assert client.mget(list(big)) == list(big.values())
        assert client.get(aio_key) == b"after"
        assert client.mget([txn_key, stay_key]) == [b"t", b"t"]
        # it adopted a newer map (the one placing shard 2, or the one with it on the ring): nodes route by
        # their own map, so a map a step behind costs a forwarding hop, never an error
        assert client.map.epoch > old.epoch  # type: ignore[union-attr]
        client.close()
    except BaseException:
        dump_logs(LocalCluster(lc.dir))
        raise
    finally:
        lc.stop()


def _shard_cli_killed_at(lc: LocalCluster, command: str, kill_at: str) -> None:
    """Run ``raftkv shard COMMAND --chunk 50 --pace 1`` and kill -9 it at its first line of progress that starts
    with ``kill_at`` (which it must print). (No rest between chunks: these tests are about where it is cut; the
    other tests here run the paced defaults.)"""
    proc = subprocess.Popen([sys.executable, "-m", "raftkv", "shard", command, "--chunk", "50", "--pace", "1",
                             "--cluster", str(lc.config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line.rstrip())
        if line.startswith(kill_at):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(10)
    print("first run, killed:", seen)
    assert any(line.startswith(kill_at) for line in seen), seen


@pytest.mark.parametrize("kill_at", ["frozen:", "epoch 3: shard 2 is on the ring"], ids=["copy", "cleanup"])
def test_shard_add_killed_is_finished_by_running_it_again(tmp_path: Path, kill_at: str) -> None:
    """kill -9 of ``raftkv shard add`` while it copies keys (or once the new map is out, as the cleanup
    starts); the next run finishes the add, under writes."""
    with _loaded_under_writes(tmp_path, shards=2) as (lc, keys, writers):
        _shard_cli_killed_at(lc, "add", kill_at)  # the copy (50 keys a chunk) or the cleanup has just begun
        rerun = Resharder(Operator(lc.config, timeout=30.0, say=print), step_timeout=60.0, say=print, pace=1.0)
        if kill_at == "frozen:":
            assert ShardMap.load(lc.config).adding == 2  # it died before the new ring went out
            assert rerun.run().shard == 2
        elif rerun._unfinished_cleanup() is not None:  # (unless the kill came after the last chunk)
            result = rerun.run()
            assert (result.shard, result.moved) == (2, 0) and result.purged > 0  # only the cleanup was left
        rerun.close()
        time.sleep(1.0)
        _stop(writers)
        _check_after_add(lc, keys, writers, 3)
        if kill_at == "frozen:":
            # the move is over everywhere: the next run adds shard 3, moving keys off shard 2 as well
            result = Resharder(Operator(lc.config, timeout=30.0, say=print), step_timeout=60.0, say=print, pace=1.0).run()
            assert result.shard == 3 and result.total == LOADED
            _check_after_add(lc, keys, writers, 4)


def test_shard_add_survives_a_source_leader_killed_mid_move(tmp_path: Path) -> None:
    """kill -9 of shard 0's leader once the sources are frozen: the run goes on with the new leader, the
    killed node restarts and catches up, and every invariant holds, replicas included."""
    lc = start_cluster(str(tmp_path / "c"), nodes=3, shards=2)
    writers: list[Overwriter] = []
    killed: list[str] = []
    try:
        keys = _load(lc)
        writers = _start_writers(lc, keys, count=2)
        time.sleep(0.5)
        op = Operator(lc.config, timeout=30.0, say=print)

        def say(msg: str) -> None:
            print(msg)
            if msg.startswith("frozen:") and not killed:
                view = op.leader_view(op.statuses(), 0)
                assert view is not None
                killed.append(view[0])
                lc.kill_node(view[0])
                print(f"killed {view[0]}, shard 0's leader")

        result = Resharder(op, step_timeout=60.0, chunk=200, say=say).run()
        assert killed and result.shard == 2
        lc.start_node(killed[0])
        LocalCluster(lc.dir).wait_ready(60)
        time.sleep(1.0)
        _stop(writers)
        _check_after_add(lc, keys, writers, 3)
    except BaseException:
        _stop(writers)
        dump_logs(LocalCluster(lc.dir))
        raise
    finally:
        LocalCluster(lc.dir).stop()
        lc.stop()


def test_a_half_done_add_is_finished_after_another_change_of_the_cluster_file(tmp_path: Path) -> None:
    """``shard add`` stops once the new shard is open and every source has handed off (the map that puts the
    shard on the ring not written yet), as a crash of the command there would; then the cluster file changes
    for another reason (``node add --empty``: a node in no shard group, epoch + 1; the fault harness found it
    with ``node remove`` / ``node add``, epoch + 2). Running ``shard add`` again must finish the add: the moved
    keys readable again (they are refused until then), the file with 3 shards and no add under way, every
    replica done with the move."""
    import socket

    lc = start_cluster(str(tmp_path / "c"), nodes=3, shards=2)
    try:
        keys = _load(lc)

        class Crash(Exception):
            pass

        def say(msg: str) -> None:
            print(msg)
            if " open; every source handed off" in msg:
                raise Crash(msg)

        with pytest.raises(Crash):
            Resharder(Operator(lc.config, timeout=30.0, say=print), step_timeout=60.0, say=say).run()
        with socket.socket() as s:  # a port for the new node's address (it is never started)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        Operator(lc.config, timeout=30.0, say=print).add(f"127.0.0.1:{port}", name="n4", start=False, join=False)
        Resharder(Operator(lc.config, timeout=30.0, say=print), step_timeout=20.0, say=print).run()
        m = ShardMap.load(lc.config)
        assert (m.nshards, m.adding) == (3, None) and m.epoch > 3  # never back below the file's epoch
        with Client(cluster=lc.config, timeout=15.0) as c:
            assert c.mget(keys) == [f"{k}:0".encode() for k in keys]
        import json

        def replicas() -> dict[str, set]:  # (n4 never ran) each node's replicas: (move, ring shards)
            return {name: {(sh["move"], sh["ring_shards"]) for sh in json.loads(call(
                m.nodes[name].client_addr, "RAFTKV.STATUS", timeout=5.0))["shards"].values()}
                for name in ("n1", "n2", "n3")}

        deadline = time.monotonic() + 20  # a follower may still be applying the end of the move
        while (seen := replicas()) != {"n1": {(None, 3)}, "n2": {(None, 3)}, "n3": {(None, 3)}}:
            assert time.monotonic() < deadline, f"a move is left on some replica: {seen}"
            time.sleep(0.2)
    except BaseException:
        dump_logs(LocalCluster(lc.dir))
        raise
    finally:
        lc.stop()


# -- removing the last shard (Resharder.remove) ------------------------------------------------------------

def _wait_reclaimed(m: ShardMap, shard: int, timeout: float = 30.0) -> None:
    """Every node dropped ``shard``'s group and deleted what it stored (engine keys and its directory)."""
    import json
    import os

    deadline = time.monotonic() + timeout
    while True:
        left = {}
        for name, info in m.nodes.items():
            st = json.loads(call(info.client_addr, "RAFTKV.STATUS", timeout=5.0))
            assert str(shard) not in st["shards"], (name, st["shards"].keys())
            engine = st["engine"]
            if engine["unhosted_keys"] or engine["reclaim"]["pending"] \
                    or os.path.exists(os.path.join(m.node_data_dir(name), f"shard-{shard}")):
                left[name] = (engine["unhosted_keys"], engine["reclaim"]["pending"])
        if not left:
            return
        assert time.monotonic() < deadline, f"shard {shard}'s data is still on {left}"
        time.sleep(0.2)


def test_shard_remove_moves_the_last_shards_keys_under_writes_and_reads(tmp_path: Path) -> None:
    """3 nodes x 3 shards; shard 2 is removed while clients overwrite and read back keys, and while n1 is down
    (killed before, restarted after: it missed every step and the new map): every acknowledged write readable,
    no stale read, no key stored twice, replicas agree (n1's too), exactly shard 2's keys moved; shard 2's
    group is gone from every node with its data (n1 finds it at its start and reclaims it)."""
    lc = start_cluster(str(tmp_path / "c"), nodes=3, shards=3)
    writers: list[Overwriter] = []
    try:
        keys = _load(lc)
        writers = _start_writers(lc, keys)
        time.sleep(1.0)
        lc.kill_node("n1")
        result = Resharder(Operator(lc.config, timeout=30.0, say=print), step_timeout=60.0, say=print).remove()
        time.sleep(1.0)
        _stop(writers)
        print(f"moved {result.moved} of {result.total} keys; steps {result.seconds}; writes during the run: "
              f"{[w.writes for w in writers]}")
        held = sum(1 for k in keys if Ring(range(3), DEFAULT_VNODES).shard_for(k) == 2)
        assert (result.shard, result.moved, result.total) == (2, held, held)
        m = ShardMap.load(lc.config)
        assert (m.removing, sorted(m.placement)) == (None, [0, 1])
        lc.start_node("n1")  # from the cluster file without shard 2, its engine still holding shard 2's data
        LocalCluster(lc.dir).wait_ready(60)
        _check_after_add(lc, keys, writers, 2)
        _wait_reclaimed(m, 2)
    except BaseException:
        _stop(writers)
        dump_logs(LocalCluster(lc.dir))
        raise
    finally:
        LocalCluster(lc.dir).stop()
        lc.stop()


def test_shard_remove_killed_mid_copy_is_finished_by_running_it_again_then_a_shard_add_works(
        tmp_path: Path) -> None:
    """kill -9 of ``raftkv shard remove`` while it copies shard 2's keys (50 a chunk), under writes; running
    ``remove 2`` again finishes it, a third run says it is done, another id is refused, and ``shard add``
    brings shard 2 back (a new, empty group) with the keys the ring gives it."""
    with _loaded_under_writes(tmp_path, shards=3) as (lc, keys, writers):
        _shard_cli_killed_at(lc, "remove", "frozen:")
        assert ShardMap.load(lc.config).removing == 2  # it died before the smaller map went out
        with pytest.raises(Exception, match="shard 2 is being removed"):
            Resharder(Operator(lc.config, timeout=30.0, say=print), pace=1.0).run()  # no add meanwhile
        result = Resharder(Operator(lc.config, timeout=30.0, say=print), step_timeout=60.0, say=print, pace=1.0).remove(2)
        assert result.shard == 2
        again = Resharder(Operator(lc.config, timeout=30.0, say=print), step_timeout=60.0, say=print, pace=1.0).remove(2)
        assert (again.shard, again.moved) == (2, 0)  # removed already: nothing done
        with pytest.raises(Exception, match="only the last shard"):
            Resharder(Operator(lc.config, timeout=30.0, say=print), pace=1.0).remove(0)
        time.sleep(1.0)
        _stop(writers)
        _check_after_add(lc, keys, writers, 2)
        _wait_reclaimed(ShardMap.load(lc.config), 2)
        added = Resharder(Operator(lc.config, timeout=30.0, say=print), step_timeout=60.0, say=print, pace=1.0).run()
        assert added.shard == 2 and added.total == LOADED
        assert added.moved == sum(1 for k in keys if Ring(range(3), DEFAULT_VNODES).shard_for(k) == 2)
        _check_after_add(lc, keys, writers, 3)


def test_a_removal_moves_the_leases_homed_on_the_removed_shard_to_shard_0_and_they_keep_working(
        tmp_path: Path) -> None:
    """3 shards; shard 2 is the home of a lease kept alive by a client's keep-alive thread throughout, one left
    to lapse, one revoked afterwards (24 keys each, on every shard) and of a held lock. ``shard remove`` moves
    them to shard 0 (the map's ``leases_moved`` routes their ids there): afterwards TTL counts every key of
    each, the kept one's keys outlive its 4 s ttl, the lapsed one's die with it, REVOKE deletes the revoked
    one's, the lock is still held (not lost, refused to another client) and, once released, taken with a larger
    token. ``shard add`` brings a shard 2 back, whose new lease is numbered above the moved ones and lives
    there, while the moved ones still answer on shard 0; removing it again moves that lease too."""
    lc = start_cluster(str(tmp_path / "c"), nodes=3, shards=3)
    try:
        ring = Ring(range(3), DEFAULT_VNODES)
        on2 = [k for k in (f"lk/{i}" for i in range(200)) if ring.shard_for(k.encode()) == 2]
        groups = {g: [f"{g}/{i}" for i in range(24)] for g in ("revoked", "kept", "lapsed")}
        assert all({ring.shard_for(k.encode()) for k in ks} == {0, 1, 2} for ks in groups.values())
        with Client(cluster=lc.config, timeout=15.0) as c, c.lease(4, near=on2[0]) as kept, \
                c.lease(4, near=on2[1]) as lapsed, c.lock(on2[2], ttl=4) as lock:
            ids = {"revoked": c.lease_grant(60, near=on2[3]), "kept": kept.id, "lapsed": lapsed.id}
            for g, ks in groups.items():
                for k in ks:
                    c.put(k, g, lease=ids[g])
            long = c.lease_grant(60, near=on2[5])
            c.put(on2[5], "long", lease=long)
            removed = Resharder(Operator(lc.config, timeout=30.0, say=print), step_timeout=60.0, say=print).remove()
            assert removed.shard == 2
            m = ShardMap.load(lc.config)
            assert m.nshards == 2 and m.leases_moved.get(2, 0) >= max(i >> 10 for i in ids.values())
            time.sleep(5.0)  # longer than the 4 s leases: only keep-alives reaching shard 0 keep them
            for g, ks in groups.items():
                assert c.mget(ks) == [g.encode()] * len(ks), g
                assert c.lease_ttl(ids[g]).keys == len(ks), g
            assert not kept.lost and not lock.lost
            with Client(cluster=lc.config, timeout=15.0) as other, pytest.raises(LockTimeout):
                other.lock(on2[2], ttl=4, wait=0.5).__enter__()
            c.lease_revoke(ids["revoked"])
            assert c.mget(groups["revoked"]) == [None] * len(groups["revoked"])
            lapsed.abandon()
            time.sleep(6.0)
            assert c.mget(groups["lapsed"]) == [None] * len(groups["lapsed"])
            assert c.mget(groups["kept"]) == [b"kept"] * len(groups["kept"])
            first_token = lock.token
        with Client(cluster=lc.config, timeout=15.0) as c:
            with c.lock(on2[2], ttl=4, wait=10) as again:
                assert again.token > first_token
            m = ShardMap.load(lc.config)
            for s in range(2):
                replicas_agree(m, s)
            # shard 2 again: its leases are numbered above the moved ones, and both kinds work
            assert Resharder(Operator(lc.config, timeout=30.0, say=print), step_timeout=60.0, say=print).run().shard == 2
            fresh = c.lease_grant(60, near=on2[4])
            assert fresh & 1023 == 2 and fresh >> 10 > ShardMap.load(lc.config).leases_moved[2]
            c.put(on2[4], "fresh", lease=fresh)
            assert c.lease_keepalive(long) == 60 and c.lease_ttl(long).keys == 1 and c.get(on2[5]) == b"long"
            assert c.lease_ttl(fresh).keys == 1
            with pytest.raises(RaftKVError, match="NOLEASE"):
                c.lease_ttl(ids["kept"])  # revoked as its with-block ended, on shard 0
            assert Resharder(Operator(lc.config, timeout=30.0, say=print), step_timeout=60.0, say=print).remove().shard == 2
            assert ShardMap.load(lc.config).leases_moved[2] >= fresh >> 10
            assert c.lease_ttl(fresh).keys == 1 and c.get(on2[4]) == b"fresh"
            c.lease_revoke(fresh)
            c.lease_revoke(long)
            assert c.get(on2[4]) is None and c.get(on2[5]) is None
    except BaseException:
        dump_logs(lc)
        raise
    finally:
        lc.stop()


def test_keys_on_leases_move_with_their_leases_and_end_with_them(tmp_path: Path) -> None:
    """``shard add`` with keys on leases (on both shards, about a third of them moving): the add completes, and
    afterwards every lease still covers all of its keys, moved or not: TTL counts them, KEEPALIVE keeps the
    moved ones alive past the time the new shard was first told, REVOKE deletes them, and a lease no longer
    kept alive takes them with it when it runs out. Then ``shard remove`` of the new shard moves its keys on
    leases back, and the leases keep covering them."""
    lc = start_cluster(str(tmp_path / "c"), nodes=3, shards=2)
    try:
        after = Ring(range(3), DEFAULT_VNODES)
        groups = {g: [f"{g}/{i}" for i in range(24)] for g in ("revoked", "kept", "lapsed")}
        assert all(any(after.shard_for(k.encode()) == 2 for k in ks) for ks in groups.values())
        with Client(cluster=lc.config, timeout=15.0) as c, c.lease(4) as kept, c.lease(4) as lapsed:
            ids = {"revoked": c.lease_grant(60), "kept": kept.id, "lapsed": lapsed.id}
            for g, ks in groups.items():
                for k in ks:
                    c.put(k, g, lease=ids[g])
            c.put("plain", "v")
            result = Resharder(Operator(lc.config, timeout=30.0, say=print), step_timeout=60.0, say=print).run()
            assert result.shard == 2
            time.sleep(5.0)  # longer than the 4 s leases: only keep-alives reaching the new shard keep its keys
            for g, ks in groups.items():
                assert c.mget(ks) == [g.encode()] * len(ks), g
                assert c.lease_ttl(ids[g]).keys == len(ks), g
            c.lease_revoke(ids["revoked"])
            assert c.mget(groups["revoked"]) == [None] * len(groups["revoked"])
            lapsed.abandon()  # no more keep-alives: it lapses 4 s after the last one
            time.sleep(6.0)
            assert c.mget(groups["lapsed"]) == [None] * len(groups["lapsed"])
            assert c.mget(groups["kept"]) == [b"kept"] * len(groups["kept"])
            assert c.get("plain") == b"v"
            m = ShardMap.load(lc.config)
            for s in range(3):
                replicas_agree(m, s)
            # Removing shard 2 again moves its keys on leases (homed at 0 or 1) back with their leases, and the
            # homes stop naming shard 2: KEEPALIVE reaches every shard it names (no -TRYAGAIN) and keeps them.
            removed = Resharder(Operator(lc.config, timeout=30.0, say=print), step_timeout=60.0, say=print).remove()
            assert removed.shard == 2
            c.lease_keepalive(kept.id)
            time.sleep(5.0)
            assert c.mget(groups["kept"]) == [b"kept"] * len(groups["kept"])
            assert c.lease_ttl(kept.id).keys == len(groups["kept"])
            c.lease_revoke(kept.id)
            assert c.mget(groups["kept"]) == [None] * len(groups["kept"])
        m = ShardMap.load(lc.config)
        for s in range(2):
            replicas_agree(m, s)
    except BaseException:
        dump_logs(lc)
        raise
    finally:
        lc.stop()
