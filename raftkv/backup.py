"""Online backup and restore: ``raftkv backup FILE`` / ``raftkv restore FILE --dir DIR``.

Theory of operation
-------------------
A backup is taken while the cluster serves, by a client (the CLI) talking to
the shard leaders with ``RAFTKV.BACKUP`` (below):

1. **Fence.**  Raise backup fence ``id`` on every shard (a Raft write,
   ``bk_fence``, with a TTL so a crashed backup cannot block transactions for
   long).  While a shard is fenced, a PREPARE of a transaction it has not seen
   votes NO (the coordinator aborts; MSET/EXEC retry internally and clients see
   at worst a retryable ``-TXNCONFLICT``).  Single-shard writes and single-shard
   transactions are not affected.
2. **Dump.**  For each shard, the leader appends ``bk_check id`` to the shard's
   log and, in the commit callback on the Raft tick thread (right after that
   entry is applied, before any later one), copies the state: a linearizable
   per-shard snapshot.  A dump is only accepted if the fence is up and no
   transaction is prepared on the shard; otherwise the leader answers
   ``-TRYAGAIN`` and the client retries (a fenced shard's prepared set only
   shrinks, so this drains).
3. **Check.**  ``bk_check id`` again on every shard: the fence must still be up.
   An expired fence is deleted by the first state-machine command that notices,
   so "still up" proves no PREPARE was accepted on that shard at any time
   between step 1 and step 3.  Then the fences are lifted and the file written.

Shard moves (``raftkv shard add|remove``, ``raftkv.reshard``) change which
shard holds a key while the cluster serves, so a backup either sees none of a
move or is refused, never silently wrong:

* the client starts from the nodes' newest map; one that marks a shard being
  added or removed is refused at once;
* ``bk_fence`` is refused (``-SHARDMOVE``) on a shard with a move under way;
* a dump holds only the keys its shard serves (``backup_state.owned_rows``), so
  keys a finished move's cleanup has not deleted yet never enter a backup;
* each fence remembers the shard's ``(owner, move)``; the dump and step 3
  refuse if it changed (a move started or ended there during the backup), and
  step 3 also requires every shard's own ring (the one it serves under since
  its last move) to be the map's, and the nodes' map after the backup to have
  the same shards and vnodes as the one the backup used.

Together: every shard was dumped under the ring of the map in the header, with
no move started or ended on it between its fence and its check, so each key is
in exactly one shard's dump, its owner's.  These refusals raise a
``BackupError`` with ``retryable`` set: nothing was written, run the backup
again once the move is over.  The CLI fails at once rather than waiting: a
move takes as long as its copy (minutes for millions of keys) and one that
failed half-way stays until an operator runs it again, so a bounded wait would
mostly just delay the same error; a scheduler retries on the CLI's exit status
75.  Moves are never held up by a backup (``raftkv.backup_state``).

Why no transaction is half in the backup: a cross-shard transaction T commits
only after every participant voted YES at PREPARE, and (step 3) no shard
accepted a PREPARE between its fence and the end of the backup, so every
participant of a committed T prepared T *before* the fences went up, i.e.
before any dump.  A dump of shard S is only taken when S has nothing prepared,
so T had already finished on S, with T's one decided outcome: if T committed,
its writes on S are in S's dump.  That holds for every participant, so T's
writes are in the backup on all its shards or (aborted / never prepared
everywhere) on none.  Every write acknowledged before the backup started is
in it because each dump is a linearizable read taken after the start.  Plain
single-key writes to *different* shards are captured at each shard's own dump
point (per-shard consistency, like any sharded store without a global clock).

File format (version 1)::

    b"RAFTKVBK"  u32 header length  header (UTF-8 JSON)  body  SHA-256 (32 bytes)

The header holds the format version, creation time, the shard map (TOML, with
any ``[security]`` secrets removed), and per shard its key count, revision and
the byte range of its block in the body.  A shard block is
``>IQQ`` (shard, revision, key count) then per key ``>I`` key length, key,
``>I`` value length, value, ``>Q`` modification revision.  The checksum covers
everything before it.  The file is written to a temp file, fsynced and renamed.

Restore starts the new cluster's nodes (``raftkv.cluster.LocalCluster``), loads
every shard's rows through its Raft log with ``bk_load`` in batches (so the
journals, snapshots and Raft metadata are all written by the normal code
path), verifies per-shard key counts and revisions, and stops the nodes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import time
import uuid
from pathlib import Path
from typing import Any

from raftkv.filejournal import DEFAULT_STORAGE

MAGIC = b"RAFTKVBK"
FORMAT_VERSION = 1
DEFAULT_FENCE_TTL_S = 60.0
LOAD_BATCH_BYTES = 512 * 1024
LOAD_BATCH_ROWS = 5000

_BLOCK_HEAD = struct.Struct(">IQQ")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


class BackupError(Exception):
    """A backup could not be taken, or a backup file is unusable; the message says why.

    ``retryable``: nothing was written and the same backup can succeed later (a shard move was under way,
    or a fence lapsed): run it again."""

    def __init__(self, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


def map_move(m: Any) -> str | None:
    """Why a map ``m`` marking a shard being added or removed cannot be backed up now; None: it can."""
    if m.adding is not None:
        return (f"shard {m.adding} is being added (map epoch {m.epoch}); nothing was written: run the backup "
                "after the add (if it stopped half-way, run 'raftkv shard add' again to finish it)")
    if m.removing is not None:
        return (f"shard {m.removing} is being removed (map epoch {m.epoch}); nothing was written: run the backup "
                f"after the removal (if it stopped half-way, run 'raftkv shard remove {m.removing}' again)")
    return None


def check_shard(s: int, reply: list, m: Any, fence_ttl_s: float) -> None:
    """Step 3 for shard ``s``: raise ``BackupError`` unless its ``RAFTKV.BACKUP CHECK`` ``reply`` shows the
    fence still up, no move started or ended there since, and the shard serving under the ring of ``m``."""
    if len(reply) < 7:
        raise BackupError(f"shard {s}: its leader does not report shard moves (an older raftkv); nothing was "
                          "written: upgrade every node, then run the backup again")
    active, _prepared, _keys, _rev, unchanged, ring_shards, ring_vnodes = reply[:7]
    if not active:
        raise BackupError(f"shard {s}: the backup fence lapsed before the backup finished (fence TTL "
                          f"{fence_ttl_s:g} s); nothing was written, run the backup again with a larger "
                          "--fence-ttl", retryable=True)
    if not unchanged:
        raise BackupError(f"shard {s}: a shard move started or ended on it during the backup; nothing was "
                          "written: run the backup again after the move", retryable=True)
    if ring_shards and (ring_shards, ring_vnodes) != (m.nshards, m.vnodes):
        raise BackupError(f"shard {s} serves a ring of {ring_shards} shards (vnodes {ring_vnodes}), the map this "
                          f"backup used {m.nshards} (vnodes {m.vnodes}, epoch {m.epoch}): a shard was added or "
                          "removed; nothing was written: run the backup again", retryable=True)


# -- shard blocks: a small, safe binary format (never pickle from a file) -----------------

def encode_block(shard: int, revision: int, rows: list[tuple[bytes, bytes, int]]) -> bytes:
    parts = [_BLOCK_HEAD.pack(shard, revision, len(rows))]
    for key, value, rev in rows:
        parts += [_U32.pack(len(key)), key, _U32.pack(len(value)), value, _U64.pack(rev)]
    return b"".join(parts)


def decode_block(data: bytes | memoryview) -> tuple[int, int, list[tuple[bytes, bytes, int]]]:
    """Inverse of ``encode_block``; raises ``BackupError`` on any inconsistency."""
    mv = memoryview(data)
    try:
        shard, revision, n = _BLOCK_HEAD.unpack_from(mv, 0)
        pos = _BLOCK_HEAD.size
        rows = []
        for _ in range(n):
            (kl,) = _U32.unpack_from(mv, pos)
            pos += 4
            key = bytes(mv[pos:pos + kl])
            pos += kl
            (vl,) = _U32.unpack_from(mv, pos)
            pos += 4
            value = bytes(mv[pos:pos + vl])
            pos += vl
            (rev,) = _U64.unpack_from(mv, pos)
            pos += 8
            if len(key) != kl or len(value) != vl:
                raise struct.error("short")
            rows.append((key, value, rev))
    except struct.error:
        raise BackupError("shard block is truncated") from None
    if pos != len(mv):
        raise BackupError(f"shard block has {len(mv) - pos} trailing bytes")
    return shard, revision, rows


# -- client side: taking a backup --------------------------------------------------------------

def _strip_secrets(m: Any) -> Any:
    if getattr(m, "security", None):
        return dataclasses.replace(m, security={})
    return m


def take_backup(client: Any, path: str | os.PathLike, fence_ttl_s: float = DEFAULT_FENCE_TTL_S,
                log: Any = None) -> dict:
    """Write an online, consistent backup of every shard to ``path``; returns the header."""
    from raftkv.client import RaftKVError

    client._reload_map()  # the nodes' newest map: a cluster file may predate a shard add or removal
    m = client.map
    why = map_move(m)
    if why is not None:
        raise BackupError(f"backup refused: {why}", retryable=True)
    bid = uuid.uuid4().hex
    ttl = str(int(fence_ttl_s * 1000)).encode()
    say = log or (lambda _msg: None)
    started = time.time()
    blocks: dict[int, bytes] = {}
    fenced: list[int] = []
    try:
        for s in range(m.nshards):
            try:
                client._request(s, [b"RAFTKV.BACKUP", b"FENCE", str(s).encode(), bid.encode(), ttl], write=False,
                                final=("SHARDMOVE",))
            except RaftKVError as e:
                if e.code != "SHARDMOVE":
                    raise
                raise BackupError(f"backup refused, nothing was written: shard {s}: {e.message}",
                                  retryable=True) from None
            fenced.append(s)
        say(f"fence {bid} up on {m.nshards} shard(s)")
        for s in range(m.nshards):
            blocks[s] = client._request(s, [b"RAFTKV.BACKUP", b"DUMP", str(s).encode(), bid.encode()],
                                        write=False)
            say(f"shard {s}: dumped {len(blocks[s])} bytes")
        for s in range(m.nshards):
            check_shard(s, client._request(s, [b"RAFTKV.BACKUP", b"CHECK", str(s).encode(), bid.encode()],
                                           write=False), m, fence_ttl_s)
        client._reload_map()
        after = client.map
        if (after.nshards, after.vnodes) != (m.nshards, m.vnodes):
            raise BackupError(f"the shard map changed during the backup ({m.nshards} shards at epoch {m.epoch}, "
                              f"{after.nshards} at epoch {after.epoch}); nothing was written: run the backup "
                              "again", retryable=True)
    except RaftKVError as e:
        if e.code in ("SHARDMOVE", "FENCELOST"):
            raise BackupError(f"backup refused, nothing was written: {e}", retryable=True) from None
        raise BackupError(f"backup failed, nothing was written: {e}") from None
    finally:
        for s in fenced:
            try:
                client._request(s, [b"RAFTKV.BACKUP", b"LIFT", str(s).encode(), bid.encode()], write=False)
            except RaftKVError:
                pass  # the fence lapses by itself after its TTL
    per_shard = []
    offset = 0
    total = 0
    for s in range(m.nshards):
        shard, revision, rows = decode_block(blocks[s])
        if shard != s:
            raise BackupError(f"shard {s}: node returned a block for shard {shard}")
        per_shard.append({"shard": s, "keys": len(rows), "revision": revision, "offset": offset,
                          "length": len(blocks[s])})
        offset += len(blocks[s])
        total += len(rows)
    header = {
        "format": "raftkv-backup",
        "version": FORMAT_VERSION,
        "backup_id": bid,
        "created_unix": started,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started, 3),
        "cluster": m.name,
        "epoch": m.epoch,
        "shards": m.nshards,
        "vnodes": m.vnodes,
        "replication": m.replication,
        "nodes": sorted(m.nodes),
        "shard_map": _strip_secrets(m).to_toml(),
        "key_count": total,
        "per_shard": per_shard,
        "body_bytes": offset,
        "consistency": "each shard: a linearizable snapshot; across shards: no partial transaction "
                       "(backup fence)",
    }
    _write_file(path, header, [blocks[s] for s in range(m.nshards)])
    return header


def _write_file(path: str | os.PathLike, header: dict, blocks: list[bytes]) -> None:
    path = os.fspath(path)
    head = json.dumps(header, indent=1, sort_keys=True).encode()
    h = hashlib.sha256()
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            for part in (MAGIC, _U32.pack(len(head)), head, *blocks):
                h.update(part)
                f.write(part)
            f.write(h.digest())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    DEFAULT_STORAGE.fsync_dir(path)


# -- reading and verifying a backup file ---------------------------------------------------------

@dataclasses.dataclass
class Backup:
    header: dict
    shards: dict[int, tuple[int, list[tuple[bytes, bytes, int]]]]  # shard -> (revision, rows)

    @property
    def shardmap(self) -> Any:
        import tomllib

        from shards.shardmap import ShardMap

        return ShardMap.from_dict(tomllib.loads(self.header["shard_map"]), source="backup shard map")


def read_backup(path: str | os.PathLike) -> Backup:
    """Read and fully verify a backup file; ``BackupError`` says exactly what is wrong."""
    path = os.fspath(path)
    try:
        blob = Path(path).read_bytes()
    except OSError as e:
        raise BackupError(f"{path}: cannot read: {e.strerror}") from None
    if len(blob) < len(MAGIC) + 4 + 32 or blob[:len(MAGIC)] != MAGIC:
        raise BackupError(f"{path}: not a raftkv backup file (bad magic)")
    sum_ok = hashlib.sha256(blob[:-32]).digest() == blob[-32:]
    (hlen,) = _U32.unpack_from(blob, len(MAGIC))
    hstart = len(MAGIC) + 4
    try:
        header = json.loads(blob[hstart:hstart + hlen]) if hstart + hlen + 32 <= len(blob) else None
        expected = hstart + hlen + int(header["body_bytes"]) + 32 if isinstance(header, dict) else None
    except (ValueError, KeyError, TypeError):
        header = expected = None
    if not sum_ok:
        if expected is not None and len(blob) < expected:
            raise BackupError(f"{path}: truncated: {len(blob)} bytes, the header promises {expected}")
        if hstart + hlen + 32 > len(blob):
            raise BackupError(f"{path}: truncated (header runs past the end of the file)")
        raise BackupError(f"{path}: checksum mismatch: the file is corrupt (SHA-256 does not match)")
    if not isinstance(header, dict) or header.get("format") != "raftkv-backup":
        raise BackupError(f"{path}: corrupt header (not a raftkv backup header)")
    if header.get("version") != FORMAT_VERSION:
        raise BackupError(f"{path}: backup format version {header.get('version')!r} is not supported "
                          f"(this raftkv reads version {FORMAT_VERSION})")
    if len(blob) != expected:
        raise BackupError(f"{path}: {len(blob)} bytes, but the header says {expected}")
    body_start = hstart + hlen
    shards: dict[int, tuple[int, list]] = {}
    body = memoryview(blob)[body_start:-32]
    for info in header["per_shard"]:
        s, rev, rows = decode_block(body[info["offset"]:info["offset"] + info["length"]])
        if s != info["shard"] or len(rows) != info["keys"] or rev != info["revision"]:
            raise BackupError(f"{path}: shard {info['shard']} block disagrees with the header")
        shards[s] = (rev, rows)
    if sorted(shards) != list(range(header["shards"])):
        raise BackupError(f"{path}: expected blocks for shards 0..{header['shards'] - 1}, found {sorted(shards)}")
    return Backup(header, shards)


# -- restore -----------------------------------------------------------------------------------------

def restore(path: str | os.PathLike, directory: str | os.PathLike, config: str | None = None,
            keep_running: bool = False, base_port: int | None = None, log: Any = None,
            timeout: float = 60.0) -> Any:
    """Create a new cluster's data in ``directory`` from a backup; returns the ``LocalCluster``.

    Without ``config``, the new cluster copies the backup's layout (node count, shards, vnodes,
    replication) on a free loopback port range with data under ``directory/data``.  With
    ``config``, its shard count and vnodes must equal the backup's.
    """
    from raftkv.client import Client, RaftKVError
    from raftkv.cluster import ClusterError, LocalCluster, free_base_port
    from shards.shardmap import ShardMap, ShardMapError, local_cluster

    say = log or (lambda _msg: None)
    bk = read_backup(path)
    hdr = bk.header
    d = Path(directory).resolve()
    if (d / "cluster.toml").exists():
        raise BackupError(f"{d}/cluster.toml exists: restore creates a NEW cluster; choose an empty --dir")
    try:
        old = bk.shardmap
        if config is not None:
            target = ShardMap.load(config)
        else:
            n = len(old.nodes)
            target = local_cluster(n, old.nshards, base_port=base_port or free_base_port(n, old.nshards),
                                   data_dir=str(d / "data"), vnodes=old.vnodes, replication=old.replication,
                                   name=old.name)
    except ShardMapError as e:
        raise BackupError(str(e)) from None
    if target.nshards != hdr["shards"] or target.vnodes != hdr["vnodes"]:
        raise BackupError(f"backup/cluster mismatch: the backup has {hdr['shards']} shards and vnodes="
                          f"{hdr['vnodes']}, the target cluster {target.nshards} shards and vnodes="
                          f"{target.vnodes}; keys would land on the wrong shards")
    for name in target.nodes:
        nd = Path(target.node_data_dir(name))
        if nd.exists() and any(nd.iterdir()):
            raise BackupError(f"{nd} is not empty: restore only writes into empty data directories")
    lc = LocalCluster(d, target)
    lc.start()
    ok = False
    try:
        lc.wait_ready(timeout)
        with Client(cluster=lc.config, timeout=timeout) as c:
            for s in range(target.nshards):
                keys = c._request(s, [b"RAFTKV.BACKUP", b"CHECK", str(s).encode(), b"restore"], write=False)[2]
                if keys:
                    raise BackupError(f"shard {s} of the target cluster already holds {keys} keys")
            for s in range(target.nshards):
                revision, rows = bk.shards[s]
                for batch in _batches(rows):
                    block = encode_block(s, revision, batch)
                    c._request(s, [b"RAFTKV.BACKUP", b"LOAD", str(s).encode(), str(revision).encode(), block],
                               write=False)
                keys, rev = c._request(s, [b"RAFTKV.BACKUP", b"CHECK", str(s).encode(), b"restore"],
                                       write=False)[2:4]
                if keys != len(rows) or rev < revision:
                    raise BackupError(f"shard {s}: after loading, {keys} keys / revision {rev}; expected "
                                      f"{len(rows)} keys / revision >= {revision}")
                say(f"shard {s}: restored {len(rows)} keys (revision {revision})")
        ok = True
    except (RaftKVError, ClusterError) as e:
        raise BackupError(f"restore failed: {e}") from None
    finally:
        if not (ok and keep_running):
            lc.stop()
    return lc


def _batches(rows: list) -> Any:
    batch: list = []
    size = 0
    for row in rows:
        batch.append(row)
        size += len(row[0]) + len(row[1]) + 16
        if size >= LOAD_BATCH_BYTES or len(batch) >= LOAD_BATCH_ROWS:
            yield batch
            batch, size = [], 0
    if batch or not rows:
        yield batch
