"""Log time: replicated, monotonic, advancing no faster than real time (raftkv.logclock)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raftkv.logclock import LogClock
from raftkv.state import KVState
from raftkv.txn import COMMITTED, PENDING, TOMBSTONE_TTL_MS

T0 = 1_700_000_000_000
MINUTE_MS = 60_000


@dataclass
class Leader:
    """A node leading the shard; its wall clock is ``skew_ms`` off real time, and its monotonic
    clock counts from an arbitrary origin (``mono_origin_ms``)."""

    skew_ms: int
    mono_origin_ms: int = 0
    clock: LogClock = field(default_factory=LogClock)
    seen_ms: int = 0  # the newest log time its replica has applied (a replica may lag)

    def stamp(self, term: int, real_ms: int, applied_ms: int) -> int:
        """The log time this leader stamps on an entry proposed at real time ``real_ms``
        (``ShardReplica.log_now_ms``: its wall clock, ``real_ms + skew_ms``, never enters)."""
        self.seen_ms = max(self.seen_ms, applied_ms)
        return self.clock.now_ms(term, real_ms - self.mono_origin_ms, self.seen_ms)


def test_fast_leader_does_not_gc_a_fresh_record() -> None:
    """A leader whose clock runs 10 minutes fast must not forget a record finished a second ago:
    a retry of RAFTKV.TXN ID x then runs as a new transaction (twice)."""
    s = KVState()
    a, b = Leader(0, 5), Leader(10 * MINUTE_MS, -77)
    s.log_ms = T0  # an existing cluster: log time was the wall clock until now
    for i, cmd in enumerate([("tx_begin", "x", (0, 1)), ("tx_decide", "x", COMMITTED, True, (), ""),
                             ("tx_ack", "x")]):
        s.apply(cmd, a.stamp(1, T0 + i, s.log_ms))
    s.apply(("tx_gc",), b.stamp(2, T0 + 1000, s.log_ms))  # leadership moved to the fast node
    assert s.apply(("tx_begin", "x", (0, 1)), b.stamp(2, T0 + 2000, s.log_ms))[0] == COMMITTED
    assert s.apply(("tx_begin", "y", (0, 1)), b.stamp(2, T0 + 3000, s.log_ms))[0] == PENDING
    # Real time passing still forgets it (the positive space).
    s.apply(("tx_gc",), b.stamp(2, T0 + TOMBSTONE_TTL_MS + 5000, s.log_ms))
    assert "x" not in s.txns.records


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 20 * MINUTE_MS), st.integers(1, 4), st.integers(0, 6)),
                min_size=1, max_size=40),
       st.lists(st.tuples(st.integers(-30 * MINUTE_MS, 30 * MINUTE_MS), st.integers(-10**9, 10**9)), min_size=4,
                max_size=4))
def test_log_time_is_monotonic_and_never_outruns_real_time(steps: list, nodes: list) -> None:
    """Whatever the leaders' clocks, however leadership moves and however far behind a new
    leader's applied state is, log time only goes up, and between any two entries it advances
    no more than the real time between their proposals."""
    leaders = [Leader(skew, origin) for skew, origin in nodes]
    s, real, term, current = KVState(), T0, 0, None
    history: list[tuple[int, int]] = [(real, 0)]  # (real time of proposal, log time after the entry)
    for who, gap_ms, n, behind in steps:
        real += gap_ms
        if who != current:
            term, current = term + 1, who
        for _ in range(n):
            applied = history[max(0, len(history) - 1 - behind)][1]  # its replica may lag the log
            s.apply(("noop",), leaders[who].stamp(term, real, applied))
            history.append((real, s.log_ms))
    for i, (r1, l1) in enumerate(history):
        for r2, l2 in history[i + 1:]:
            assert l1 <= l2, "log time went backwards"
            assert l2 - l1 <= r2 - r1, f"log time advanced {l2 - l1} ms in {r2 - r1} ms of real time"


def test_log_time_and_deletion_revision_survive_snapshots() -> None:
    s = KVState()
    s.apply(("set", b"k", b"v"), T0)
    s.apply(("del", [b"k"]), T0 + 5)
    s.apply(("noop",), T0 + 9)
    for r in (KVState.restore(s.snapshot()), KVState.from_chunks(s.freeze().chunks())):
        assert (r.log_ms, r.del_rev, r.revision) == (T0 + 9, 2, 2)
        assert r.apply(("noop",), T0) is None and r.log_ms == T0 + 9  # clamped after restore, too


def test_a_clock_rate_change_is_continuous_and_sets_the_slope() -> None:
    """CLOCK.RATE_PCT's model: no step when the rate changes, ``rate`` ms of clock per real ms after it."""
    saved = (LogClock.rate, LogClock._anchor)
    try:
        clock = LogClock()
        assert clock.now_ms(1, 10_000, 0) == 0  # first stamp of a term: the applied log time
        LogClock.set_rate(0.5, 12_000)
        assert clock.now_ms(1, 12_000, 0) == 2_000  # continuous at the change
        assert clock.now_ms(1, 14_000, 0) == 3_000  # then half speed: log time lags real time
        LogClock.set_rate(1.0, 14_000)
        assert clock.now_ms(1, 15_000, 0) == 4_000  # back to real time, no step forward to catch up
        with pytest.raises(ValueError, match="positive"):
            LogClock.set_rate(0, 15_000)
    finally:
        LogClock.rate, LogClock._anchor = saved
