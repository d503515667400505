"""Workloads: what the harness's clients do, and how their history is checked.

A workload hands each client process a :class:`Worker` that proposes the next
operation (``f``, ``key``, ``value``, from the process's seeded ``Random``) and
performs it through the real client library, mapping the outcome onto the
history's completion types:

* ``ok``   — the call returned; its value is the result;
* ``fail`` — definitely not applied: ``UnavailableError`` (no leader / not
  reachable, nothing sent or the node refused), any other ``RaftKVError``
  (an error reply), or a read that did not complete (a read has no effect);
* ``info`` — maybe applied: ``IndeterminateError`` (code ``UNKNOWN``), or a
  write whose connection broke after the request may have left.

``register``: get / set / cas on a few keys per shard.  Written values are
unique (``"<process>.<n>"``), so a read names the write it saw.  Keys rotate
every ``key_period`` seconds (a fresh set of keys per shard, as Jepsen's
``independent`` does) so that each key's history, and so the checker's
search, stays small.  Checked per key for linearizability (``kv`` model).
With ``ttl_ops`` (``--ttl-ops F``) a fraction F of the puts are ``put-ttl``
(``SET k v PX ms``): half of them with a short ttl (``SHORT_TTL_MS``, so the
value expires while the key is still in use), half with one far longer than
any run (``LONG_TTL_MS``); checked with the ``kv-expiry`` model, which lets a
short-ttl value vanish at any moment after its put without knowing the
store's log time.

``--read-any-node`` (on by default; ``--no-read-any-node`` turns it off): each
client is bound to a fixed node (client *i* -> node *i mod N*): reads go over a
plain RESP connection to it, writes are session writes the routing client sends
to that node only (``HarnessClient(pin=...)``), which forwards what it does not
lead.  A correct node forwards or proves leadership first, so this changes
nothing for the real store; a node in ``--unsafe-local-reads`` mode answers
from its local copy, which is stale as soon as it is cut off from its shard's
majority.

``--read-routing own|shared`` (default ``own``): without ``--read-any-node``,
register and set reads go through the routing ``Client``.  ``own``: each
worker reads through a second ``Client`` of its own, whose leader cache only
its reads' failures refresh, as a process that only reads would; ``shared``:
through the worker's write client, where a write that fails on a deposed
leader re-routes the reads after it too.  Under a partition a shared client
leaves a deposed leader at its next write on that shard (about a second after
the cut, when the old leader steps down and the write fails), before the new
leader has acknowledged much, so a node that wrongly serves reads is rarely
read at the moment it is stale; an own read client stays with it until a read
fails, which a correct node makes happen and an unsafe one never does.

``counter``: the classic lost-update check through Redis's optimistic
transactions. Each increment is ``WATCH k; GET k`` (recorded as a ``get``)
then ``MULTI; SET k v+1; EXEC`` (recorded as ``cas [v, v+1]``: EXEC commits
only if ``k`` did not change since the WATCH, so a committed EXEC is exactly a
compare-and-set from the value read; an aborted EXEC applied nothing and is a
``fail`` -- it says the key changed after the WATCH, which may have come before
the GET, so not that the value differed from ``v``). A client whose node does not
answer moves on to the next node. Checked per key for linearizability
(``kv`` model) and by ``lost-update``: each counter's final value lies between
the acknowledged increments and those plus the indeterminate ones.

``lock``: clients acquire and release a few locks per shard (``Client.lock``:
the lock key held through a lease kept alive in the background), rotated every
``key_period`` seconds.  History ops are ``acquire`` / ``release`` per lock
name; checked per lock with the mutex model (at most one holder at a time).

``append``: Elle's list-append over the transaction API.  Each transaction is
1-4 micro-ops ``["append", k, x]`` (``x`` unique in the run: ``"<process>.<n>"``)
or ``["r", k, None]`` on the current key group (keys on every shard, rotated
every ``key_period`` seconds like ``txn``, so each list stays short).  An
append is ``APPEND k "x,"`` inside ``RAFTKV.TXN`` (computed under the
transaction's lock on ``k``); a read is a ``GET`` in the same transaction, its
value split on ``,`` into the list (as Jepsen's Redis list-append test does with
strings; a value not ending in ``,`` keeps its tail as an element, which Elle
reports as a garbage read).  Checked by ``elle.check(ops, "list-append")``:
G0, G1a/b/c, G-single, G2-item, lost update, internal, duplicate elements, ...
named with their cycles.  The final reads are one read-only transaction per
key group.

``set``: Jepsen's set.  Each client adds unique elements (``"<process>.<n>"``) with ``APPEND k "e,"`` on
one of ``keys_per_shard`` fixed keys per shard (the store has no set type; ``Client.append``, a
de-duplicated write) and reads the whole set: a ``GET`` of every key, one after another, through the
routing ``Client`` or, with ``--read-any-node``, over plain RESP to the client's pinned node (the read's
``key`` in the history names that node).  The default operation timeout is short (``SET_OP_TIMEOUT_S``),
so adds caught in a failover come back indeterminate (``info``) and the final reads decide them.  The final
reads, after the heal, read the whole set through every node and last through the routing client.
Checked per element by :func:`jepsen_like.sets.check_set` (lost, stale, unexpected, duplicated); a set
spread over shards is read key by key, not as one snapshot, which a per-element check does not need.

``bank``, ``txn`` and ``append`` need the transaction API (``Client.txn()``; for
``append``, its ``then_append``); in a build without it they raise
:class:`WorkloadUnavailable`.
"""

from __future__ import annotations

from typing import Any

from jepsen_like.workloads.bank import BankWorkload
from jepsen_like.workloads.base import (
    CLIENT_AUTH,
    KEY_PREFIXES,
    READ_ROUTINGS,
    Worker,
    WorkloadUnavailable,
    _txn_api_available,
    classify,
    default_op_timeout,
    parse_list,
)
from jepsen_like.workloads.counter import CounterWorkload, lost_updates
from jepsen_like.workloads.lock import LockWorkload
from jepsen_like.workloads.register import RegisterWorkload
from jepsen_like.workloads.set_adds import SetWorkload
from jepsen_like.workloads.txn import AppendWorkload, TxnWorkload
from raftkv.txnclient import Txn

__all__ = ["WORKLOADS", "WorkloadUnavailable", "Worker", "RegisterWorkload", "SetWorkload", "make_workload",
           "default_op_timeout", "classify", "CLIENT_AUTH", "KEY_PREFIXES", "AppendWorkload", "BankWorkload",
           "CounterWorkload", "LockWorkload", "TxnWorkload", "lost_updates", "parse_list", "READ_ROUTINGS"]

WORKLOADS = ("register", "counter", "bank", "txn", "lock", "append", "set")


def make_workload(name: str, shardmap: Any, seed: int, **kw: Any) -> Any:
    """The workload ``name``; raises :class:`WorkloadUnavailable` when this build cannot run it."""
    if kw.get("read_routing", "own") not in READ_ROUTINGS:
        raise ValueError(f"unknown read routing {kw['read_routing']!r} (expected one of {', '.join(READ_ROUTINGS)})")
    if name == "register":
        return RegisterWorkload(shardmap, seed, **kw)
    if name == "counter":
        return CounterWorkload(shardmap, seed, **kw)
    if name in ("bank", "txn", "append"):
        if not _txn_api_available() or (name == "append" and not callable(getattr(Txn, "then_append", None))):
            raise WorkloadUnavailable(
                f"workload {name!r} is not available in this build: it needs the transaction API "
                "(raftkv.Client.txn(), with then_append for 'append'), which this raftkv.Client does not have yet")
        return {"bank": BankWorkload, "txn": TxnWorkload, "append": AppendWorkload}[name](shardmap, seed, **kw)
    if name == "lock":
        return LockWorkload(shardmap, seed, **kw)
    if name == "set":
        return SetWorkload(shardmap, seed, **kw)
    raise ValueError(f"unknown workload {name!r} (expected one of {', '.join(WORKLOADS)})")
