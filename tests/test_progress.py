"""A long operator command says how far it has come: one line redrawn on a terminal, a line every interval
in a log, nothing for a short copy in a log, and its line erased before any other message."""

from __future__ import annotations

import io

from hypothesis import given
from hypothesis import strategies as st

from raftkv.progress import Progress, ProgressLine, render


def test_a_known_total_draws_a_bar_and_an_unknown_one_counts() -> None:
    line = render(Progress("shard 0 -> shard 3", 5_000, 20_000, 2_000_000, 2.0), width=10)
    assert line == "[##--------]  25% shard 0 -> shard 3: 5,000 of ~20,000 keys, 2.0 MB, 1.0 MB/s"
    assert render(Progress("copy", 700, None, 350_000, 1.0)) == "copy: 700 keys, 0.3 MB, 0.3 MB/s"
    assert render(Progress("deleting", 700, 1_400, None, 1.0), width=4) == "[##--]  50% deleting: 700 of ~1,400 keys"


@given(done=st.integers(0, 10**7), total=st.integers(1, 10**7), width=st.integers(1, 60))
def test_the_bar_never_overflows_and_an_estimate_passed_reads_99_percent(done: int, total: int, width: int) -> None:
    line = render(Progress("x", done, total, 0, 0.0), width=width)
    bar = line[1:line.index("]")]
    assert len(bar) == width and set(bar) <= {"#", "-"}
    pct = int(line[line.index("]") + 1:line.index("%")])
    assert abs(pct - min(done / total, 0.99) * 100) <= 0.5 + 1e-9


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_a_terminal_redraws_one_line_at_most_five_times_a_second_and_clears_it() -> None:
    out, clock = io.StringIO(), _Clock()
    line = ProgressLine(out, tty=True, clock=clock)
    for i in range(10):  # 10 updates in 0.09 s: one drawn
        clock.t = i * 0.01
        line(Progress("copy", i, 100, 0, clock.t))
    assert out.getvalue().count("\r\x1b[K") == 1 and "copy: 0 of ~100" in out.getvalue()
    clock.t = 0.25
    line(Progress("copy", 50, 100, 0, 0.25))
    assert out.getvalue().endswith("\r\x1b[K[############------------]  50% copy: 50 of ~100 keys, 0.0 MB, 0.0 MB/s")
    line.clear()
    assert out.getvalue().endswith("\r\x1b[K")
    n = len(out.getvalue())
    line.clear()  # nothing shown: nothing to erase
    assert len(out.getvalue()) == n


def test_a_log_gets_a_line_per_interval_and_nothing_for_a_short_copy() -> None:
    out, clock = io.StringIO(), _Clock()
    line = ProgressLine(out, tty=False, interval=10.0, clock=clock)
    for i in range(90):  # 9 s of updates: nothing
        clock.t = i * 0.1
        line(Progress("copy", i, None, 0, clock.t))
    assert out.getvalue() == ""
    for i in range(90, 310):  # to 31 s: a line at 10, 20 and 30 s
        clock.t = i * 0.1
        line(Progress("copy", i, None, 0, clock.t))
    assert out.getvalue().count("\n") == 3 and "\r" not in out.getvalue()
    line.end()  # the next operation starts afresh: quiet for its first interval
    clock.t = 35.0
    line(Progress("next", 1, None, 0, 0.0))
    assert out.getvalue().count("\n") == 3
