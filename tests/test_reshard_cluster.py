"""``raftkv shard add`` on real node processes: keys move to the new shard while clients write and read.

3 nodes, 2 shards, a few thousand keys loaded, then shard 2 is added while client threads keep
overwriting keys (session writes through ``raftkv.Client``) and reading each one back right after
its write. Afterwards: every acknowledged write's value is the one read, every read during the move
saw its thread's own latest write (no stale read), no key is stored on two shards (the shards' key
counts add up to the number of distinct keys, every one of which is readable), the moved fraction
is within 1.25x of 1/3, and every shard's replicas hold the same data (HASHKV).
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

from raftkv import Client
from raftkv.cluster import LocalCluster, call
from raftkv.errors import IndeterminateError, RaftKVError
from raftkv.membership import Operator
from raftkv.resharder import Resharder
from shards.ring import Ring
from shards.shardmap import ShardMap

from .conftest import dump_logs, start_cluster

LOADED = 3000


class Overwriter(threading.Thread):
    """Overwrites its own keys with increasing values and reads each back at once.

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
        i = 0
        while not self.stop.is_set():
            key = self.rng.choice(self.keys)
            i += 1
            value = f"{key}:{i}".encode()
            try:
                self.client.put(key, value)
            except IndeterminateError:
                self.maybe.setdefault(key, []).append(value)
                continue
            except RaftKVError as e:
                self.errors.append(f"put {key}: {e}")
                continue
            self.last[key] = value
            self.maybe.pop(key, None)
            self.writes += 1
            try:
                got = self.client.get(key)
            except RaftKVError as e:
                self.errors.append(f"get {key}: {e}")
                continue
            if got != value:
                self.stale.append((key, value, got))
        self.client.close()


def _hashkv_agree(m: ShardMap, shard: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        answers = {}
        for name in m.placement[shard]:
            rev, digest = call(m.nodes[name].client_addr, "RAFTKV.HASHKV", str(shard), timeout=10.0)
            answers[name] = (rev, digest)
        if len({a[0] for a in answers.values()}) == 1:
            assert len({a[1] for a in answers.values()}) == 1, f"shard {shard}: replicas diverged: {answers}"
            return
        assert time.monotonic() < deadline, f"shard {shard}: replicas never at one revision: {answers}"
        time.sleep(0.2)


def _shard_key_counts(m: ShardMap) -> dict[int, int]:
    """Keys each shard's leader holds (moved-away keys not yet deleted included)."""
    import json

    counts: dict[int, int] = {}
    for info in m.nodes.values():
        st = json.loads(call(info.client_addr, "RAFTKV.STATUS", timeout=5.0))
        for s, sh in st["shards"].items():
            if sh["role"] == "leader":
                counts[int(s)] = sh["keys"]
    return counts


def test_shard_add_moves_keys_under_writes_and_reads(tmp_path: Path) -> None:
    lc = start_cluster(str(tmp_path / "c"), nodes=3, shards=2)
    writers: list[Overwriter] = []
    try:
        keys = [f"key-{i}" for i in range(LOADED)]
        with Client(cluster=lc.config, timeout=15.0) as c:
            for i in range(0, LOADED, 500):
                c.mset({k: f"{k}:0" for k in keys[i:i + 500]})
        writers = [Overwriter(str(lc.config), keys[i::3], seed=i) for i in range(3)]
        for w in writers:
            w.start()
        time.sleep(1.0)
        op = Operator(lc.config, timeout=30.0, say=print)
        result = Resharder(op, step_timeout=60.0, say=print).run()
        time.sleep(1.0)
        for w in writers:
            w.stop.set()
        for w in writers:
            w.join(30)

        m = ShardMap.load(lc.config)
        assert (m.nshards, m.adding, result.shard) == (3, None, 2)
        share = 1 / 3
        print(f"moved {result.moved} of {result.total} keys: {result.fraction:.4f} (1/3 = {share:.4f}); "
              f"steps {result.seconds}; writes during the move: {[w.writes for w in writers]}")
        assert share / 1.25 <= result.fraction <= share * 1.25
        # the keys moved are exactly the ones the new ring gives shard 2
        assert result.moved == sum(1 for k in keys if Ring(range(3), m.vnodes).shard_for(k) == 2)
        assert result.purged == result.moved
        stale = [s for w in writers for s in w.stale]
        assert stale == [], f"reads that missed their own thread's acknowledged write: {stale[:5]}"
        errors = [e for w in writers for e in w.errors]
        assert errors == [], f"errors surfaced to the clients: {errors[:5]}"
        assert sum(w.writes for w in writers) > 0
        with Client(cluster=lc.config, timeout=15.0) as c:
            values = c.mget(keys)
        expected: dict[str, bytes] = {k: f"{k}:0".encode() for k in keys}
        maybe: dict[str, list[bytes]] = {}
        for w in writers:
            expected.update(w.last)
            for k, vs in w.maybe.items():
                maybe.setdefault(k, []).extend(vs)
        wrong = [(k, v) for k, v in zip(keys, values, strict=True)
                 if v != expected[k] and v not in maybe.get(k, [])]
        assert wrong == [], f"{len(wrong)} keys do not hold their latest acknowledged write: {wrong[:5]}"
        counts = _shard_key_counts(m)
        assert sorted(counts) == [0, 1, 2]
        assert sum(counts.values()) == LOADED, f"a key is stored on two shards: {counts}"
        for s in range(3):
            _hashkv_agree(m, s)
    except BaseException:
        for w in writers:
            w.stop.set()
        dump_logs(LocalCluster(lc.dir))
        raise
    finally:
        lc.stop()
