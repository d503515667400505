"""The ``lock`` workload (see the package doc)."""

from __future__ import annotations

import random
import time
from typing import Any

from jepsen_like.checker import check
from jepsen_like.models import get_model
from jepsen_like.workloads.base import (
    Worker,
    _RotatingGroups,
    _TxnWorkerBase,
    classify,
)


class LockWorkload(_RotatingGroups):
    """acquire / release of ``keys_per_shard`` locks per shard, rotated every ``key_period`` s.

    Each client alternates: acquire a random current lock (waiting at most
    ``op_timeout``), then release it at its next op.  Outcomes:

    * acquire ``ok``: held (its value is the fencing token); ``fail``: not held
      (another holder kept it for the whole wait, or no leader); ``info``: unknown
      (``Client.lock`` revokes its lease on the way out, so it is not held after);
    * release ``ok``: the lease was revoked (the lock key is gone); ``info`` for
      anything else: a revocation that failed leaves the lock to expire with its
      lease, and a lease found *lost* (it lapsed while the client believed it held
      the lock) is recorded as ``info`` too, so an acquire by another client
      before the release's invocation shows up as two holders.

    The lease ttl is ``lock_ttl`` s, long against the nemeses' faults (the log time
    that expires a lease stands still while a shard has no leader), and against the
    end of the run: a client still holding at the end abandons its lock (its lease
    expires after the run) so that no unrecorded release races another client's
    last acquire.  Checked with the mutex model, partitioned per lock.

    ``unsafe_lock_lapse`` (``--unsafe-lock-lapse``) is the negative control on a real
    cluster: holders take a 1 s lease, stop its keep-alive at once and wait
    ``LAPSE_HOLD_S`` before releasing, as a holder paused past its lease would; the
    lock goes to the next client meanwhile, which the mutex check must report.
    """

    LAPSE_HOLD_S = 2.5

    name = "lock"
    model = "mutex"
    prefix = "lock"

    def __init__(self, shardmap: Any, seed: int, keys_per_shard: int = 1, key_period: float = 5.0,
                 op_timeout: float = 4.0, lock_ttl: float = 15.0, unsafe_lock_lapse: bool = False,
                 **_: Any) -> None:
        super().__init__(shardmap, seed, keys_per_shard, key_period, op_timeout)
        self.lapse = unsafe_lock_lapse
        self.lock_ttl = 1.0 if unsafe_lock_lapse else lock_ttl

    def worker(self, process: Any, rng: random.Random, final: bool = False) -> Worker:
        return _LockWorker(self, process, rng)

    def final_ops(self) -> list[tuple[str, Any, Any]]:
        return []

    def check(self, ops: list, timeout_s: float | None) -> dict[str, Any]:
        return {"mutex": check(ops, get_model(self.model), timeout_s=timeout_s)}


class _LockWorker(_TxnWorkerBase):
    def __init__(self, wl: LockWorkload, process: Any, rng: random.Random) -> None:
        super().__init__(wl, process, rng)
        self.held: Any = None  # the raftkv.client.Lock this client holds

    def next_op(self, t: float) -> tuple[str, Any, Any]:
        if self.held is not None:
            if self.wl.lapse:  # hold past the lease, between the acquire's return and the release's invocation
                time.sleep(self.wl.LAPSE_HOLD_S)
            return "release", self.held.name.decode(), None
        return "acquire", self.rng.choice(self.wl.group_at(t)), None

    def invoke(self, f: str, key: Any, value: Any) -> tuple[str, Any]:
        if f == "acquire":
            lock = self.client.lock(key, ttl=self.wl.lock_ttl, wait=self.wl.op_timeout)
            try:
                token = lock.acquire()
            except Exception as e:  # noqa: BLE001
                return classify(e, write=True), str(e)[:200]
            if self.wl.lapse:
                lock.abandon()
            self.held = lock
            return "ok", token
        lock, self.held = self.held, None
        try:
            lock.release()
        except Exception as e:  # noqa: BLE001 - not revoked: the lock lapses with its lease, some time later
            return "info", str(e)[:200]
        return ("info", "lease lost while held") if lock.lost else ("ok", None)

    def close(self) -> None:
        if self.held is not None:
            self.held.abandon()  # its lease expires after the run (see LockWorkload)
        super().close()
