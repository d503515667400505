"""The command table: every RESP command a node serves, assembled explicitly from one module per area.

=============  ==================================================================
``kv``         GET SET DEL EXISTS MGET CAS RAFTKV.CASNX RAFTKV.STALEGET RAFTKV.REQ
``strings``    INCR INCRBY DECR DECRBY INCRBYFLOAT APPEND GETDEL GETSET GETEX SETNX MSETNX STRLEN
``rename``     COPY RENAME RENAMENX (one transaction across shards)
``expiry``     EXPIRE PEXPIRE EXPIREAT PEXPIREAT TTL PTTL PERSIST (and SET's EX/PX/EXAT/PXAT/KEEPTTL)
``keyspace``   SCAN KEYS RAFTKV.RANGE
``watch``      RAFTKV.WATCH (the change feed)
``locks``      RAFTKV.LOCK RAFTKV.UNLOCK
``leases``     RAFTKV.LEASE (and SET's LEASE)
``txn``        MSET RAFTKV.TXN WATCH MULTI EXEC DISCARD UNWATCH RAFTKV.TXSTATS
``admin``      PING ECHO HELLO AUTH INFO READONLY ... RAFTKV.STATUS/SHARDS/CLUSTER/TRANSFER
``backup``     RAFTKV.BACKUP
``member``     RAFTKV.MEMBER RAFTKV.MAP
``reshard``    RAFTKV.RESHARD (moving keys to a new shard, raftkv.reshard)
``acl``        RAFTKV.USER RAFTKV.ROLE
``internal``   RAFTKV.CHALLENGE RAFTKV.NODEAUTH RAFTKV.RPC (node to node)
=============  ==================================================================

A handler is ``handler(node: NodeAPI, conn: Conn, req) -> reply | future``.
"""

from __future__ import annotations

from raftkv.server.api import Command
from raftkv.server.commands import (
    acl,
    admin,
    backup,
    expiry,
    internal,
    keyspace,
    kv,
    leases,
    locks,
    member,
    rename,
    reshard,
    strings,
    txn,
    watch,
)

COMMANDS: dict[bytes, Command] = {}
for _module in (kv, strings, rename, expiry, keyspace, watch, locks, leases, txn, admin, backup, member, reshard, acl,
                internal):
    _clash = COMMANDS.keys() & _module.COMMANDS.keys()
    assert not _clash, f"command defined twice: {_clash}"
    COMMANDS.update(_module.COMMANDS)

MULTI_CONTROL = txn.CONTROL
queue_in_multi = txn.queue

__all__ = ["COMMANDS", "MULTI_CONTROL", "queue_in_multi"]
