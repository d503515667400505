"""Kills during log compaction: the ``compaction`` fault, kill -9 while a node checkpoints and compacts its
Raft log, and while it installs a snapshot, with the status and log polling it needs to time the kills.

``compaction``: kill -9 while a node checkpoints and compacts its Raft log, and while it installs a
snapshot.  ``RAFTKV.FAULT COMPACT.NOW -1`` makes every replica of a node checkpoint into the engine and
drop its log prefix at its next tick, caught-up followers or not (the runner arms it with ``--fault
compact.now:0``).  The two variants alternate, the first drawn at random; each first waits until every
node answers.  *checkpoint kill*: a random node (or a shard leader) is told to compact, and killed
``COMPACTION_KILL_DELAY_S * u**3`` (0-200 ms, half the time within 20 ms) after its log says its first
checkpoint began.  *install kill*: a random node Y is killed; once every shard committed
``COMPACTION_MISSED`` entries without it, every other node is told to compact (their logs then start past
what Y holds); Y is restarted, so it must install snapshots, and is killed again the same random delay after
its log says the first snapshot chunk arrived.  The window's end restarts the killed node.  The detail gives
the others' per-shard ``RAFTKV.STATUS`` counters (``checkpoints``, ``snapshots_sent``, since the process
started) before and after, and what the killed node logged before the kill: ``event=checkpoint_begin`` /
``event=checkpoint`` and ``event=snapshot_receiving`` / ``event=snapshot_installed``; more begun than
finished is a kill in the middle of one.
"""

from __future__ import annotations

import json
import time

from .base import Fault, NemesisBase, _read_from, _size

COMPACTION_KILL_DELAY_S = 0.2
"""A ``compaction`` kill lands at most this long after the node logged that its first checkpoint began (or
that the first chunk of a snapshot reached it); the delay is drawn as ``max * u**3`` (u uniform), so nearly
half the kills land within 20 ms, while a checkpoint or a small snapshot install (a few to tens of ms each in
a harness run) may still be under way."""
COMPACTION_LOAD_S = 0.5
"""How long the ``compaction`` nemesis lets the load run with its follower down, at least, before forcing the
compaction that cuts the entries it missed out of the others' logs ..."""
COMPACTION_MISSED = 3
"""... and how many entries every shard must have committed without it by then (a follower missing fewer
than 2 is caught up from the log even after the compaction, which keeps the last two applied entries)."""
COMPACTION_WAIT_S = 5.0
"""The longest the ``compaction`` nemesis waits for those commits, for forced checkpoints to begin or commit."""
COMPACTION_INSTALL_WAIT_S = 10.0
"""The longest it waits for the restarted node to receive its first snapshot chunk (start-up included)."""


class CompactionFaults(NemesisBase):
    """``compaction``: the checkpoint kill and the install kill, alternating."""

    _compaction_turn: int | None

    # -- compaction: kill -9 during a checkpoint, and during a snapshot install ---------------------------------
    def _compaction_fault(self) -> Fault:
        """The two variants alternate (the first drawn at random), so any run with two compaction windows has
        both: ``checkpoint`` kills a node right after forcing its compactions; ``install`` makes a restarted
        node install snapshots and kills it during the install."""
        if self._compaction_turn is None:
            self._compaction_turn = self.rng.randrange(2)
        variant = ("checkpoint", "install")[self._compaction_turn % 2]
        self._compaction_turn += 1
        return self._kill_in_checkpoint() if variant == "checkpoint" else self._kill_in_install()

    def _kill_delay(self) -> float:
        return COMPACTION_KILL_DELAY_S * self.rng.random() ** 3

    def _kill_in_checkpoint(self) -> Fault:
        """Force every replica of one node to checkpoint and compact its log; kill -9 it a random few ms after
        its first checkpoint began (``event=checkpoint_begin`` in its log).

        The detail counts the checkpoints the node logged as begun and as committed (``event=checkpoint``)
        before the kill: more begun than committed is a kill in the middle of a checkpoint.
        """
        self._wait_answering(self.nodes)
        node, why = self._target()
        f = Fault("compaction", f"checkpoint kill: {node} ({why})", [node], self.clock())
        log_at = _size(self.cluster.log_file(node))
        told = self._compact_now(node)
        begun = self._wait_log(node, log_at, "event=checkpoint_begin ", COMPACTION_WAIT_S)
        delay = self._kill_delay()
        _sleep(delay)
        self.cluster.kill_node(node)  # raises unless the process is gone
        text = _read_from(self.cluster.log_file(node), log_at)
        f.detail += (f": RAFTKV.FAULT COMPACT.NOW to {told} replicas, kill -9 {delay * 1000:.0f} ms after "
                     + ("its first checkpoint began" if begun else
                        f"waiting {COMPACTION_WAIT_S:g} s for a checkpoint that never began")
                     + f"; checkpoints begun {text.count('event=checkpoint_begin ')}, committed "
                     f"{text.count('event=checkpoint ')} before the kill")
        return f

    def _kill_in_install(self) -> Fault:
        """kill -9 a node Y; wait until every shard committed a few entries without it; force compactions on
        every other node (their logs then start past what Y has); restart Y, which must install snapshots;
        kill -9 it again a random few ms after the first snapshot chunk reached it (``event=snapshot_receiving``
        in its log); the window's end restarts it.  The detail gives the others' checkpoint and snapshots-sent
        counters before and after, and the installs Y logged as begun and as finished
        (``event=snapshot_installed``) before the second kill: more begun than finished is a kill in the
        middle of an install."""
        self._wait_answering(self.nodes)  # a node the last window restarted may still be starting
        node = self.rng.choice(self.nodes)
        f = Fault("compaction", f"install kill: {node} (random node)", [node], self.clock())
        others = [n for n in self.nodes if n != node]
        at_kill = self._commit_indexes(self.nodes)
        self.cluster.kill_node(node)
        try:
            _sleep(COMPACTION_LOAD_S)
            progressed = self._wait_commits(others, at_kill, COMPACTION_MISSED, COMPACTION_WAIT_S)
            before = self._snapshot_counters(others)
            for n in others:
                self._compact_now(n)
            compacted = self._wait_counters(others, "checkpoints", before, timeout=COMPACTION_WAIT_S)
            log_at = _size(self.cluster.log_file(node))
            self.cluster.start_node(node)
            receiving = self._wait_log(node, log_at, "event=snapshot_receiving ", COMPACTION_INSTALL_WAIT_S)
            delay = self._kill_delay()
            _sleep(delay)
            self.cluster.kill_node(node)
            sent = self._snapshot_counters(others)
            text = _read_from(self.cluster.log_file(node), log_at)
            f.detail += (": kill -9, then "
                         + ("" if progressed else f"(fewer than {COMPACTION_MISSED} commits in some shard after "
                                                  f"{COMPACTION_WAIT_S:g} s) ")
                         + f"COMPACT.NOW on {', '.join(others)}: checkpoints "
                         f"{_total(before, 'checkpoints')} -> {_total(compacted, 'checkpoints')}; restarted {node}: "
                         f"snapshots sent {_total(compacted, 'snapshots_sent')} -> {_total(sent, 'snapshots_sent')}; "
                         f"kill -9 {delay * 1000:.0f} ms after "
                         + ("the first snapshot chunk reached it" if receiving else
                            f"waiting {COMPACTION_INSTALL_WAIT_S:g} s for a snapshot that never came")
                         + f"; snapshot installs begun {text.count('event=snapshot_receiving ')}, finished "
                         f"{text.count('event=snapshot_installed ')} before the kill")
        except Exception as e:  # noqa: BLE001 - Y is down: return the fault, so that the window's end restarts it
            f.error = f"{type(e).__name__}: {e}"
        return f

    def _status(self, node: str) -> dict | None:
        """``node``'s RAFTKV.STATUS, None if it does not answer."""
        try:
            return json.loads(self.cluster.call(node, "RAFTKV.STATUS"))
        except Exception:  # noqa: BLE001 - callers treat a silent node as missing
            return None

    def _wait_answering(self, nodes: list[str], timeout: float = 15.0) -> None:
        """Until every node in ``nodes`` answers RAFTKV.STATUS (or ``timeout`` s passed)."""
        deadline = self.clock() + timeout
        while any(self._status(n) is None for n in nodes) and self.clock() < deadline:
            _sleep(0.1)

    def _commit_indexes(self, nodes: list[str]) -> dict[str, int]:
        """Per shard, the highest commit index any of ``nodes`` reports."""
        out: dict[str, int] = {}
        for n in nodes:
            for shard, v in ((self._status(n) or {}).get("shards") or {}).items():
                out[shard] = max(out.get(shard, 0), int(v.get("commit_idx") or 0))
        return out

    def _wait_commits(self, nodes: list[str], since: dict[str, int], count: int, timeout: float) -> bool:
        """Until every shard in ``since`` committed ``count`` more entries (as ``nodes`` report); False if
        ``timeout`` s passed first."""
        deadline = self.clock() + timeout
        while True:
            now = self._commit_indexes(nodes)
            if all(now.get(shard, 0) >= i + count for shard, i in since.items()):
                return True
            if self.clock() >= deadline:
                return False
            _sleep(0.05)

    def _wait_log(self, node: str, offset: int, needle: str, timeout: float) -> bool:
        """Until ``node``'s log has ``needle`` past ``offset``; False if ``timeout`` s passed first."""
        deadline = self.clock() + timeout
        while needle not in _read_from(self.cluster.log_file(node), offset):
            if self.clock() >= deadline:
                return False
            _sleep(0.001)
        return True

    def _compact_now(self, node: str) -> int:
        """``RAFTKV.FAULT COMPACT.NOW -1`` to ``node``; the number of replicas told; raises unless confirmed."""
        reply = self.cluster.call(node, "RAFTKV.FAULT", "COMPACT.NOW", "-1")
        if not isinstance(reply, int) or isinstance(reply, bool):
            raise RuntimeError(f"{node} refused RAFTKV.FAULT COMPACT.NOW: {reply}")
        return reply

    def _snapshot_counters(self, nodes: list[str]) -> dict[str, dict[str, int]]:
        """Per node, its shards' checkpoint and snapshot counters summed (RAFTKV.STATUS) and its shard count;
        a node that does not answer is left out."""
        out = {}
        for n in nodes:
            shards = ((self._status(n) or {}).get("shards") or {}).values()
            if shards:
                out[n] = {k: sum(int(v.get(k, 0)) for v in shards)
                          for k in ("checkpoints", "snapshots_sent", "snapshots_installed")}
                out[n]["shards"] = len(shards)
        return out

    def _wait_counters(self, nodes: list[str], key: str, before: dict[str, dict[str, int]],
                       timeout: float) -> dict[str, dict[str, int]]:
        """Poll the counters until ``key`` moved or ``timeout`` s passed; the last reading.  Checkpoints must
        have moved by a shard count on every node (each replica compacted); anything else, anywhere."""
        deadline = self.clock() + timeout
        while True:
            now = self._snapshot_counters(nodes)
            if key == "checkpoints":
                moved = all(n in now and now[n][key] - before.get(n, {}).get(key, 0) >= now[n]["shards"]
                            for n in nodes)
            else:
                moved = _total(now, key) > _total(before, key)
            if moved or self.clock() >= deadline:
                return now
            _sleep(0.02)


def _total(counters: dict[str, dict[str, int]], key: str) -> int:
    return sum(c.get(key, 0) for c in counters.values())


def _sleep(seconds: float) -> None:
    time.sleep(seconds)
