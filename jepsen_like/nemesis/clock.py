"""Clock faults: ``clock`` (steps back, or a slow rate, of a node's log time: inside the fault model) and
``clock-forward`` (steps either way, or a fast rate: outside it), through ``RAFTKV.FAULT CLOCK.*``.

``clock``: ``RAFTKV.FAULT CLOCK.SKEW_MS`` steps a random node's clock for
log time (:mod:`raftkv.logclock`) *back* by ``CLOCK_SKEW_S`` seconds (1 s to
2 min).  Steps only ever go back (a node's offset only decreases; a restarted
node is at 0, above any offset the nemesis set), because that is the fault
log time is built to tolerate: monotonic clocks never jump forward, and log
time stands still rather than go back.  The window's end undoes nothing (a
clock that is behind stays behind).

``clock-forward`` (not in ``all``): steps of +/- ``CLOCK_SKEW_S`` seconds, set
back to 0 at the window's end, so every fault includes a *forward* step: the
node's log time jumps ahead, which the design excludes (logclock's
assumption: monotonic clocks tick at the real rate) and which expires leases
early on the shards that node leads.  It shows that hazard (docs/jepsen.md).

Either kind is, half the time, a rate fault instead of a step: the node's clock runs at
``CLOCK_RATE_SLOW_PCT`` (``clock``) or ``CLOCK_RATE_FAST_PCT`` (``clock-forward``) percent of real time
until the window's end sets it back to 100 %.
"""

from __future__ import annotations

from .base import Fault, NemesisBase

CLOCK_SKEW_S = (1.0, 120.0)
"""Size range of a clock step (seconds)."""
CLOCK_RATE_SLOW_PCT = (25, 90)
"""Range of a ``clock`` rate fault (percent of real time): slow clocks only make log time lag."""
CLOCK_RATE_FAST_PCT = (110, 400)
"""Range of a ``clock-forward`` rate fault: fast clocks advance log time too soon, like a forward step."""


class ClockFaults(NemesisBase):
    """``clock`` and ``clock-forward``: a rate fault half the time, else a step."""

    skews: dict[str, int]
    _rates: dict[int, str]

    def _start_clock(self, kind: str) -> Fault:
        if self.rng.random() < 0.5:
            node, why = self._target()
            pct = round(self.rng.uniform(*(CLOCK_RATE_SLOW_PCT if kind == "clock" else CLOCK_RATE_FAST_PCT)))
            f = Fault(kind, f"clock of {node} ({why}) runs at {pct} % of real time", [node], self.clock())
            self._set_rate(node, pct)
            self._rates[id(f)] = node
            return f
        node, why = self._target()
        step_ms = round(self.rng.uniform(*CLOCK_SKEW_S) * 1000)
        if kind == "clock":
            skew_ms = self.skews.get(node, 0) - step_ms
        else:
            step_ms = skew_ms = step_ms * self.rng.choice((1, -1))
            step_ms -= self.skews.get(node, 0)
        f = Fault(kind, f"clock of {node} ({why}) stepped {(-step_ms if kind == 'clock' else step_ms) / 1000:+.1f} s "
                  f"(offset {skew_ms / 1000:+.1f} s)", [node], self.clock())
        self._set_skew(node, skew_ms)
        return f

    def _end_clock(self, f: Fault) -> None:
        """A rate fault goes back to real time; a forward step back to offset 0; a ``clock`` step stays."""
        if id(f) in self._rates:  # a rate fault (clock or clock-forward): back to real time
            self._set_rate(self._rates[id(f)], 100)
        elif f.kind == "clock-forward":
            for n in f.nodes:
                self._set_skew(n, 0)

    def _heal_clocks(self) -> list[str]:
        """The heal: every clock rate still changed back to real time, every open forward step back to 0."""
        done = []
        for f in self.faults:  # a clock rate still changed: back to real time (no step, so always safe)
            if id(f) in self._rates and f.end is None:
                try:
                    self._set_rate(self._rates[id(f)], 100)
                    done.append(f"clock of {f.nodes[0]} back to real time")
                except Exception:  # noqa: BLE001 - a node that does not answer is restarted below, at 100 %
                    pass
        # A forward-step fault still open: its clock back to 0 (clocks the clock nemesis set back stay back).
        for f in self.faults:
            if f.kind == "clock-forward" and f.end is None and id(f) not in self._rates:
                try:
                    self._set_skew(f.nodes[0], 0)
                    done.append(f"clock of {f.nodes[0]} reset")
                except Exception:  # noqa: BLE001 - a node that does not answer is restarted below, at 0
                    pass
        return done

    def _set_skew(self, node: str, skew_ms: int) -> None:
        """Set ``node``'s clock offset; raises unless the node confirms (it replies the previous offset)."""
        reply = self._fault_call(node, "CLOCK.SKEW_MS", str(skew_ms))
        if not isinstance(reply, int) or isinstance(reply, bool):
            raise RuntimeError(f"{node} refused RAFTKV.FAULT CLOCK.SKEW_MS {skew_ms}: {reply}")
        self.skews[node] = skew_ms

    def _set_rate(self, node: str, pct: int) -> None:
        """Set ``node``'s clock rate (percent of real time); raises unless the node confirms."""
        reply = self._fault_call(node, "CLOCK.RATE_PCT", str(pct))
        if not isinstance(reply, int) or isinstance(reply, bool):
            raise RuntimeError(f"{node} refused RAFTKV.FAULT CLOCK.RATE_PCT {pct}: {reply}")
