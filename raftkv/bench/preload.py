"""Preloading the key space into a system under test before it is measured.

raftkv gets its bulk path (``Client.put_many``: one-shard transactions of up to 500 keys, several in
flight); Redis gets pipelined plain ``SET``s over a few blocking connections; etcd gets ``/v3/kv/put`` over HTTP keep-alive from a pool of threads.
"""

from __future__ import annotations

import http.client
import json
import threading
import time

from raftkv import protocol
from raftkv.bench.etcd_http import b64
from raftkv.bench.load import RETRY_CODES
from raftkv.bench.systems import EtcdGrpcSystem, EtcdSystem, RaftKVSystem, System
from raftkv.bench.workloads import key_name, make_value
from raftkv.client import Client
from raftkv.connection import Connection


def preload(system: System, n: int, value_size: int = 100, start: int = 0, pipeline: int = 100,
            conns_per_node: int = 3) -> float:
    """Write keys ``start..n-1`` (see module doc for how, per system); returns the seconds taken."""
    t0 = time.monotonic()
    v = make_value(value_size)
    if isinstance(system, EtcdGrpcSystem):
        system = system.etcd  # the keys are the same whichever API reads them
    if isinstance(system, EtcdSystem):
        _preload_etcd(system, range(start, n), v)
        return time.monotonic() - t0
    if isinstance(system, RaftKVSystem):
        # raftkv's bulk path (Client.put_many): one-shard transactions of up to 500 keys, in parallel
        with Client(cluster=system.lc.map, timeout=60) as c:
            c.put_many((key_name(i), v) for i in range(start, n))
        return time.monotonic() - t0
    groups = {tuple(system.spec()["addr"]): list(range(start, n))}  # Redis: one address
    jobs = [(addr, idx[c::conns_per_node]) for addr, idx in groups.items() for c in range(conns_per_node)]
    errors: list[str] = []
    retry: list[tuple[tuple[str, int], int]] = []

    def load(addr: tuple[str, int], idx: list[int]) -> None:
        with Connection(*addr, timeout=60) as conn:
            for j in range(0, len(idx), pipeline):
                chunk = idx[j:j + pipeline]
                replies = conn.pipeline([(b"SET", key_name(i), v) for i in chunk])
                for i, rep in zip(chunk, replies, strict=True):
                    if isinstance(rep, protocol.ReplyError):
                        if rep.code in RETRY_CODES:  # BUSY (back-pressure), TRYAGAIN...: send again below
                            retry.append((addr, i))
                        else:
                            errors.append(str(rep))

    threads = [threading.Thread(target=load, args=job) for job in jobs if job[1]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for addr, i in retry:
        with Connection(*addr, timeout=10) as conn:
            rep = conn.call(b"SET", key_name(i), v)
        if isinstance(rep, protocol.ReplyError):
            errors.append(str(rep))
    if errors:
        raise RuntimeError(f"preload: {len(errors)} errors, first: {errors[0]}")
    return time.monotonic() - t0


def _preload_etcd(system: EtcdSystem, idx: range, v: bytes, threads: int = 24) -> None:
    vb = b64(v)
    errors: list[str] = []

    def load(part: range, addr: tuple[str, int]) -> None:
        c = http.client.HTTPConnection(*addr, timeout=30)
        for i in part:
            c.request("POST", "/v3/kv/put", json.dumps({"key": b64(key_name(i)), "value": vb}),
                      {"Content-Type": "application/json"})
            r = c.getresponse()
            r.read()
            if r.status != 200:
                errors.append(str(r.status))
        c.close()

    ts = [threading.Thread(target=load, args=(idx[t::threads], system.addr(system.names[t % len(system.names)])))
          for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise RuntimeError(f"etcd preload: {len(errors)} errors")
