"""Log time: the clock a shard's log entries carry.  Pure: the caller passes the readings in.

Theory of operation
-------------------
Every horizon of the state machine (transaction GC, remembered transaction ids,
session expiry, lock and PENDING ages, backup fences) compares *log time*: the
``now_ms`` stamped into each entry.  It used to be the proposing leader's wall
clock, so a leader whose clock ran 10 minutes fast forgot, at once, records
and tombstones a correct leader had written a second before.

Now log time never comes from a wall clock.  A leader stamps

    stamp = L_b + (m - m_b)

where ``L_b`` is the newest log time its replica had applied when it last
re-based, ``m_b`` its monotonic clock then, and ``m`` its monotonic clock now.
It re-bases at the start of every term (its first stamp in a term is the log
time it has applied, so a change of leader never moves log time forward) and
whenever its applied state is ahead of the formula.  The state machine clamps
(``KVState.apply``): an entry's log time is ``max(stamp, previous log time)``,
so log time is replicated and monotonic whatever the stamps say.

The argument that a horizon never comes early: for entries i before j in the
log, proposed at real times r_i <= r_j, log time advances by at most
r_j - r_i.  A stamp adds to an applied log time ``L_b`` only the real time
since the leader saw ``L_b`` applied, in its current term: entries of older
terms were proposed before that term began, so before ``m_b``; entries of this
term applied after ``m_b`` are this leader's own, stamped on the same chain.
Wall-clock offsets never enter.  So "forget after 10 minutes of log time"
means "after at least 10 minutes of real time", whoever leads.  (Re-basing
only on "applied is ahead" is not enough: a node that led long ago would
come back with its old base and jump log time forward by every pause since.)
Log time may *lag* real time (while no leader is elected it stands still), and
that only makes horizons later: memory is kept a little longer, locks are
resolved a little later.  It assumes monotonic clocks tick at the real rate
(they drift by parts per million).

Clock faults: :attr:`LogClock.skew_ms` is added to every monotonic reading of
the process (one node = one process = one clock).  It is 0 except under fault
injection (``raftkv serve --fault clock.skew_ms:MS``, or ``RAFTKV.FAULT
CLOCK.SKEW_MS ms`` at run time, which the harness's ``clock`` nemesis sends):
changing it steps the node's clock by the difference, which the argument above
does not allow for a forward step (docs/jepsen.md, "clock").  :attr:`LogClock.rate`
makes the node's monotonic clock tick at that rate from the moment it is set
(:meth:`LogClock.set_rate`, continuous: no step): ``RAFTKV.FAULT CLOCK.RATE_PCT``.
A clock that runs slow (rate < 1) only makes log time lag real time, which the
argument allows; one that runs fast advances it too soon, like a forward step.
"""

from __future__ import annotations


class LogClock:
    """A replica's source of log time for the entries it proposes (see the module doc)."""

    skew_ms = 0
    """The node's clock offset (ms) under fault injection, class-wide: every replica of a node reads one clock."""
    rate = 1.0
    """The node's clock rate under fault injection (1.0: real time), class-wide like ``skew_ms``."""
    _anchor = (0, 0.0)  # (monotonic ms, clock ms) when the rate last changed: the clock is continuous there

    @classmethod
    def set_rate(cls, rate: float, mono_ms: int) -> None:
        """From ``mono_ms`` on, the node's clock ticks ``rate`` ms per real ms (no step at the change)."""
        if rate <= 0:
            raise ValueError(f"clock rate must be positive, not {rate}")
        cls._anchor = (mono_ms, cls.clock_ms(mono_ms))
        cls.rate = rate

    @classmethod
    def clock_ms(cls, mono_ms: int) -> float:
        """The node's (faulty) monotonic clock at real monotonic ``mono_ms``, before the skew."""
        m0, c0 = cls._anchor
        return c0 + (mono_ms - m0) * cls.rate

    def __init__(self) -> None:
        # (term, log time, monotonic ms) at the last re-base; one tuple, so a reader on another
        # thread (metrics) never pairs one base's log time with another's monotonic reading.
        self.base: tuple[int, int, int] | None = None

    def now_ms(self, term: int, mono_ms: int, applied_log_ms: int) -> int:
        """Log time to stamp now, in Raft ``term``: ``mono_ms`` from a monotonic clock,
        ``applied_log_ms`` the replica's applied log time (``KVState.log_ms``)."""
        if LogClock.rate != 1.0 or LogClock._anchor != (0, 0.0):
            mono_ms = int(LogClock.clock_ms(mono_ms))
        mono_ms += LogClock.skew_ms
        base = self.base
        if base is None or base[0] != term or base[1] + (mono_ms - base[2]) < applied_log_ms:
            base = self.base = (term, applied_log_ms, mono_ms)
        return base[1] + (mono_ms - base[2])
