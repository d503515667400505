"""Where one put's time goes: the median timeline of a single-client put across the three node processes.

    .venv/bin/python bench/put_timeline.py --seconds 8 [--engine lmdb|rocksdb] [--node-arg=--unsafe-no-sync]

Starts a local 3-node cluster whose node processes record timestamps at a few points of the write path (a
``sitecustomize`` wraps the functions below; nothing in raftkv changes), sends ``SET`` to each key's shard
leader from one client, one request at a time, and prints for the median request when each step happened,
in ms after the client sent it. ``CLOCK_MONOTONIC`` is one clock for every process of the machine, so the
nodes' timestamps and the client's line up.

Steps recorded (leader = the node that got the request, from its proposal on; follower = the one whose ack came
first, from the leader's AppendEntries on):

* ``propose``: the request's batch handed to the shard's Raft group (the asyncio thread, ``Proposer._flush``);
* ``loop``: the Raft driver's ``poll`` returned (woken by the proposal, or by frames);
* ``send``: frames sealed for a peer (``RaftNetwork._seal``); on the leader first the AppendEntries, on the
  follower the ack;
* ``recv``: a record read from a peer (``RaftNetwork._on_record``);
* ``commit``/``commit done``: the storage engine's commit (write + fsync) began / ended;
* ``apply``: the state machine applied a batch (``KVState.apply_batch``);
* ``reply``: the reply future resolved on the asyncio thread (``batch._resolve``); the client has the reply
  at the end (the median total).

Other traffic (heartbeats of idle groups every 25 ms) is recorded too; a median over many requests smooths it.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import glob
import os
import random
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raftkv import protocol  # noqa: E402
from raftkv.cluster import LocalCluster  # noqa: E402

HOOKS = r'''
import os, sys, threading, time
_dir = os.environ.get("RAFTKV_TIMELINE")
if _dir:
    sys.path.insert(0, {root!r})
    _ev = []
    _out = os.path.join(_dir, "%d.tl" % os.getpid())

    def _rec(name):
        _ev.append((time.monotonic_ns(), name))

    def _dump():
        while True:
            time.sleep(0.2)
            n = len(_ev)
            if n:
                chunk = _ev[:n]
                del _ev[:n]
                with open(_out, "a") as f:
                    f.writelines("%d %s\n" % e for e in chunk)

    threading.Thread(target=_dump, daemon=True).start()
    import raftkv.driver, raftkv.engine, raftkv.raftnet, raftkv.server.batch, raftkv.state

    def _wrap(owner, attr, before=None, after=None, cond=None):
        orig = getattr(owner, attr)

        def f(*a, **k):
            on = cond is None or cond(a)
            if before and on:
                _rec(before)
            r = orig(*a, **k)
            if after and on:
                _rec(after)
            return r

        setattr(owner, attr, f)

    b = raftkv.server.batch
    _wrap(b.Proposer, "_flush", before="propose", cond=lambda a: type(a[0]) is b.Proposer and a[0].pending)
    _wrap(b, "_resolve", before="reply")
    _wrap(raftkv.engine.Engine, "_commit_buffered", before="commit", after="commit_done")
    _wrap(raftkv.raftnet.RaftNetwork, "_on_record", before="recv")
    _wrap(raftkv.raftnet.RaftNetwork, "_seal", before="send")
    _wrap(raftkv.raftnet.RaftNetwork, "poll", after="loop")
    _wrap(raftkv.state.KVState, "apply_batch", before="apply")
'''


def drive(lc: LocalCluster, seconds: float, keyspace: int = 1000, mset: bool = False) -> list[tuple[int, int]]:
    """One client, one request at a time to its (first) key's shard leader, for ``seconds``: a ``SET``, or with
    ``mset`` a two-key transaction over two shards (``RAFTKV.TXN``, as ``Client.mset`` sends it).
    Returns ``(sent_ns, replied_ns)`` per request."""
    leaders = lc.leaders()
    if None in leaders.values():
        raise RuntimeError(f"not every shard has a leader: {leaders}")
    socks = {n: socket.create_connection(lc.map.nodes[n].client_addr) for n in lc.map.nodes}
    for s in socks.values():
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rng = random.Random(1)
    value = b"v" * 100
    out = []
    conflicts = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        key = b"k%d" % rng.randrange(keyspace)
        sock = socks[leaders[lc.map.shard_for_key(key)]]
        if mset:
            other = key
            while lc.map.shard_for_key(other) == lc.map.shard_for_key(key):
                other = b"k%d" % rng.randrange(keyspace)
            req = protocol.encode_command(b"RAFTKV.TXN", b"ID", b"%x" % rng.getrandbits(64), b"0", b"2",
                                          b"PUT", key, value, b"PUT", other, value, b"0")
        else:
            req = protocol.encode_command(b"SET", key, value)
        t0 = time.monotonic_ns()
        sock.sendall(req)
        reply = sock.recv(4096)
        t1 = time.monotonic_ns()
        if mset and reply.startswith(b"-TXNCONFLICT"):
            # the previous transaction's locks, still being released at a participant whose leader is not
            # the next coordinator: a retryable answer, left out of the timeline (and counted)
            conflicts += 1
            continue
        if not reply.startswith(b"*" if mset else b"+OK"):
            raise RuntimeError(f"unexpected reply {reply!r}")
        out.append((t0, t1))
    for s in socks.values():
        s.close()
    if conflicts:
        print(f"{conflicts} transactions answered TXNCONFLICT (left out)")
    return out


def load_events(directory: str) -> dict[str, list[tuple[int, str]]]:
    """Every node process's recorded steps: ``{pid: [(time ns, step), ...]}`` in time order."""
    ev: dict[str, list[tuple[int, str]]] = {}
    for fn in glob.glob(os.path.join(directory, "*.tl")):
        rows = []
        for line in open(fn):
            t, name = line.split()
            rows.append((int(t), name))
        rows.sort()
        ev[os.path.basename(fn)[:-3]] = rows
    return ev


Events = dict[str, list[tuple[int, str]]]  # process id -> (time ns, step), in time order


def windows(requests: list[tuple[int, int]], ev: Events) -> Iterator[tuple[int, int, Events]]:
    """Each request's ``(sent, replied, every process's steps between the two)``."""
    times = {pid: [t for t, _ in rows] for pid, rows in ev.items()}
    for t0, t1 in requests:
        yield t0, t1, {pid: rows[bisect.bisect_left(times[pid], t0):bisect.bisect_right(times[pid], t1)]
                       for pid, rows in ev.items()}


def _proposer(window: Events) -> str | None:
    return next((pid for pid, rows in window.items() if any(n == "propose" for _, n in rows)), None)


def leader_and_follower(window: Events) -> list[tuple[str, list[tuple[int, str]]]]:
    """A put's roles: the leader (from its proposal on) and the follower whose ack counted (from the leader's
    AppendEntries on); empty if the request's window lacks them."""
    leader = _proposer(window)
    if leader is None:
        return []
    t_prop = next(t for t, n in window[leader] if n == "propose")
    lead = [(t, n) for t, n in window[leader] if t >= t_prop]
    t_ae = next((t for t, n in lead if n == "send"), None)
    if t_ae is None:
        return []
    # The follower that counted: the earliest to send after a commit of its own that began after the
    # leader's AppendEntries left (its ack). Earlier events (heartbeats, the previous entry) are left out.
    acks = {}
    for pid, rows in window.items():
        if pid == leader:
            continue
        after = [(t, n) for t, n in rows if t >= t_ae]
        done = next((t for t, n in after if n == "commit_done"), None)
        ack = None if done is None else next((t for t, n in after if n == "send" and t >= done), None)
        if ack is not None:
            acks[pid] = (ack, after)
    if not acks:
        return []
    follower = min(acks, key=lambda pid: acks[pid][0])
    return [("leader", lead), ("follower", acks[follower][1])]


def every_process(window: Events) -> list[tuple[str, list[tuple[int, str]]]]:
    """A transaction's roles: ``entry`` (where the first proposal came from) and the other processes."""
    entry = _proposer(window)
    if entry is None:
        return []
    others = sorted(pid for pid in window if pid != entry)
    return [("entry", window[entry])] + [(f"other-{i + 1}", window[p]) for i, p in enumerate(others)]


def timeline(requests: list[tuple[int, int]], ev: Events,
             roles: Callable[[Events], list] = leader_and_follower) -> tuple[list, float, int]:
    """Median offset (ms after the client sent) of each (role, step, occurrence) seen in most requests."""
    offsets: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    used = 0
    for t0, _t1, window in windows(requests, ev):
        chosen = roles(window)
        used += bool(chosen)
        for role, events in chosen:
            seen: collections.Counter = collections.Counter()
            for t, name in events:
                seen[name] += 1
                offsets[(role, f"{name}#{seen[name]}")].append((t - t0) / 1e6)
    rows = [(statistics.median(v), role, step, len(v)) for (role, step), v in offsets.items() if len(v) > used * 0.6]
    total = statistics.median((t1 - t0) / 1e6 for t0, t1 in requests)
    return sorted(rows), total, used


def show(requests: list[tuple[int, int]], ev: Events, count: int) -> None:
    """Print every recorded step of ``count`` requests from the middle of the run, in time order."""
    names = {pid: f"node-{i + 1}" for i, pid in enumerate(sorted(ev))}
    mid = len(requests) // 2
    for t0, t1, window in windows(requests[mid:mid + count], ev):
        print(f"-- one request, {(t1 - t0) / 1e6:.3f} ms (ms after the client sent, process, step)")
        steps = sorted((t, names[pid], n) for pid, rows in window.items() for t, n in rows)
        for t, who, name in steps:
            print(f"  {(t - t0) / 1e6:7.3f}  {who}  {name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument("--engine", choices=["lmdb", "rocksdb"], default=None, help="store of the new cluster")
    ap.add_argument("--node-arg", action="append", default=[], help="extra 'raftkv serve' argument (repeatable)")
    ap.add_argument("--mset", action="store_true",
                    help="a two-key transaction over two shards instead of a SET; every process's steps are shown")
    ap.add_argument("--show", type=int, default=0, metavar="N", help="also print every step of N single requests")
    args = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory(prefix="raftkv-timeline-") as d:
        hooks_dir, ev_dir = os.path.join(d, "hooks"), os.path.join(d, "events")
        os.makedirs(hooks_dir)
        os.makedirs(ev_dir)
        with open(os.path.join(hooks_dir, "sitecustomize.py"), "w") as f:
            f.write(HOOKS.format(root=root))
        env = dict(os.environ, RAFTKV_TIMELINE=ev_dir,
                   PYTHONPATH=hooks_dir + os.pathsep + os.environ.get("PYTHONPATH", ""))
        node_args = list(args.node_arg) + (["--engine", args.engine] if args.engine else [])
        lc = LocalCluster.create(os.path.join(d, "cluster"), nodes=3, shards=args.shards, node_args=node_args,
                                 env=env)
        lc.start()
        try:
            lc.wait_ready(60)
            drive(lc, 1.0, mset=args.mset)  # warm-up: connections made, first entries of each term committed
            for fn in glob.glob(os.path.join(ev_dir, "*.tl")):
                os.truncate(fn, 0)
            time.sleep(0.5)
            requests = drive(lc, args.seconds, mset=args.mset)
            time.sleep(0.5)  # the nodes write their events every 0.2 s
        finally:
            lc.stop()
        events = load_events(ev_dir)
        rows, total, used = timeline(requests, events, every_process if args.mset else leader_and_follower)
        if args.show:
            show(requests, events, args.show)
    print(f"{len(requests)} {'transactions' if args.mset else 'puts'}, one at a time; client-measured median {total:.3f} ms; "
          f"timeline of {used} requests (median ms after the client sent; steps seen in > 60 % of them):")
    for ms, role, step, n in rows:
        print(f"  {ms:7.3f}  {role:8s} {step:16s} (in {n} requests)")


if __name__ == "__main__":
    main()
