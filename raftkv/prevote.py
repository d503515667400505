"""Pre-vote (Raft thesis §9.6): a node asks whether it *could* win before it starts an election.

Without it, a node that was cut off (a partition, a long pause, a slow disk) times out again and again; each
time stock pysyncobj starts an election, which raises its term.  When it can talk again, its first
``request_vote`` carries that higher term and every member that sees it steps down, the live leader
included: a healthy shard loses its leader because one replica was away, though the returning node cannot
win (its log is behind).

With pre-vote, a node whose election timer fires first sends a *pre-vote request* for the term it would
campaign in, changing nothing of its own (no new term, no vote).  A member grants it only if

* it has not heard from a leader within the minimum election timeout (so a live leader's followers refuse:
  etcd's ``CheckQuorum`` lease, which pre-vote needs to stop exactly this disruption), and is not the leader;
* the requested term is above its own; and
* the requester's log is at least as up to date as its own (the same rule as a real vote).

Granting changes nothing on the granter either.  Only with a majority of grants (itself included) does the
node start the real election.  A refusal carries the refuser's term: a requester behind in terms adopts it
(as it would on any message of a higher term), so its next request asks for a term the others can grant.

A leadership transfer (``timeout_now``) skips pre-vote: the leader asked for the election.

Pure: the rules and the tally, no I/O or clocks (callers pass elapsed times in).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

REQUEST = "raftfix_prevote"
REPLY = "raftfix_prevote_reply"


@dataclass(frozen=True)
class Request:
    """A pre-vote request: the term the sender would campaign in, and its last log entry."""

    term: int
    last_log_index: int
    last_log_term: int


def grants(req: Request, *, term: int, last_log_index: int, last_log_term: int, is_leader: bool,
           leader_silent_s: float | None, min_timeout_s: float) -> bool:
    """Whether a member in this state grants ``req`` (module doc).

    ``leader_silent_s``: seconds since this member last heard from a leader it accepted, or None if it
    has no leader.  ``min_timeout_s``: the group's minimum election timeout.
    """
    if is_leader:
        return False
    if leader_silent_s is not None and leader_silent_s < min_timeout_s:
        return False  # a leader is alive as far as this member can tell
    if req.term <= term:
        return False
    return (req.last_log_term, req.last_log_index) >= (last_log_term, last_log_index)


@dataclass
class Round:
    """One pre-vote round: grants for ``term`` out of a group of ``size`` voters (the requester included)."""

    term: int
    size: int
    granted: set[Hashable] = field(default_factory=set)

    def won(self) -> bool:
        """A majority of the group, counting the requester's own grant."""
        return 1 + len(self.granted) > self.size / 2

    def add(self, voter: Hashable, term: int) -> bool:
        """Count ``voter``'s grant for ``term`` (a grant for another round is ignored); whether now won."""
        if term == self.term:
            self.granted.add(voter)
        return self.won()
