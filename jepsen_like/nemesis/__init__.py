"""Faults: kill -9 and restart, SIGSTOP/SIGCONT pauses, network partitions, membership changes,
clock steps, slow disks, full disks and kills during compactions and snapshot installs, on a seeded schedule.

One module per fault family, each with the docstring that says what its faults do and why:

* :mod:`.schedule`: the fault kinds, ``--nemesis`` parsing, the seeded schedule of windows (pure);
* :mod:`.core`: :class:`Nemesis`, which runs a schedule against a cluster (theory of operation there);
* :mod:`.base`: the :class:`Fault` record and the primitives every family shares;
* :mod:`.process`: ``kill`` and ``pause``; :mod:`.partition`: ``partition`` and its shapes;
  :mod:`.member`: ``member``; :mod:`.clock`: ``clock`` and ``clock-forward``;
  :mod:`.disk`: ``slow-disk`` and ``disk``; :mod:`.compaction`: ``compaction``;
  :mod:`.power_loss`: ``power``; :mod:`.reshard`: ``reshard`` and :func:`moves_left`.

Everything callers use is importable from here, as it was from the single module this package replaces.
Tests that replace a module-level function (``fill_disk``, ``_sleep``) patch the module that calls it.
"""

from .base import FAULT_CALL_WAIT_S, Fault
from .clock import CLOCK_RATE_FAST_PCT, CLOCK_RATE_SLOW_PCT, CLOCK_SKEW_S
from .compaction import (
    COMPACTION_INSTALL_WAIT_S,
    COMPACTION_KILL_DELAY_S,
    COMPACTION_LOAD_S,
    COMPACTION_MISSED,
    COMPACTION_WAIT_S,
)
from .core import Nemesis
from .disk import FILL_LIMIT_BYTES, FILLER, SLOW_DISK_MS, engine_failure, fill_disk, free_disk, is_small_tmpfs
from .partition import PARTITION_SHAPES, partition_edges
from .reshard import (
    REMOVE_CUT_POINTS,
    RESHARD_CLI_WAIT_S,
    RESHARD_CUT_POINTS,
    RESHARD_MAX_SHARDS,
    RESHARD_MIN_SHARDS,
    RESHARD_NODE_EVERY,
    RESHARD_STEP_TIMEOUT_S,
    moves_left,
)
from .schedule import EXTRA_KINDS, FAULT_KINDS, NEMESES, OPTIONAL_KINDS, make_schedule, parse_nemesis

__all__ = ["Fault", "Nemesis", "NEMESES", "FAULT_KINDS", "OPTIONAL_KINDS", "PARTITION_SHAPES", "make_schedule",
           "moves_left", "parse_nemesis",
           "partition_edges",
           # the fault families' settings and pure helpers, importable here as before the split
           "EXTRA_KINDS", "CLOCK_SKEW_S", "CLOCK_RATE_SLOW_PCT", "CLOCK_RATE_FAST_PCT", "SLOW_DISK_MS",
           "FAULT_CALL_WAIT_S", "FILLER", "FILL_LIMIT_BYTES", "COMPACTION_KILL_DELAY_S", "COMPACTION_LOAD_S",
           "COMPACTION_MISSED", "COMPACTION_WAIT_S", "COMPACTION_INSTALL_WAIT_S", "RESHARD_MAX_SHARDS",
           "RESHARD_NODE_EVERY", "RESHARD_MIN_SHARDS", "RESHARD_STEP_TIMEOUT_S", "RESHARD_CUT_POINTS",
           "REMOVE_CUT_POINTS", "RESHARD_CLI_WAIT_S", "is_small_tmpfs", "fill_disk", "free_disk",
           "engine_failure"]
