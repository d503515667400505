"""Which consistency models a set of anomalies rules out (a subset of Elle's ``consistency-model``).

Two small tables, both DAGs written as ``{name: [names]}``:

* ``IMPLIED_ANOMALIES``: ``a -> b`` means "a history with anomaly a also has
  anomaly b" (G0 is also a G1c; a G1c is also a G1c-process, ...).  Our
  G-single cycles are over item anti-dependencies (there are no predicates),
  i.e. Elle's *G-single-item*, so G-single implies G2-item.
* ``MODELS``: ``a -> b`` means "model a implies model b" (strict
  serializable implies serializable, ...), and ``PROSCRIBES`` names the
  anomalies each model forbids directly (Adya; Bailis et al.; Cerone et al.).

A model is impossible if it proscribes an anomaly the history has (after
expanding implications), or implies an impossible model.  ``not`` is the set of
weakest impossible models, ``also_not`` the rest.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["ANOMALY_NAMES", "MODEL_NAMES", "implied_anomalies", "impossible_models", "boundary", "prohibits"]

_VARIANTS = ("", "-process", "-realtime")

IMPLIED_ANOMALIES: dict[str, list[str]] = {
    "G0": ["G1c", "G0-process"],
    "G0-process": ["G1c-process", "G0-realtime"],
    "G0-realtime": ["G1c-realtime"],
    "G1a": ["G1"],
    "G1b": ["G1"],
    "G1c": ["G1", "G1c-process"],
    "G1c-process": ["G1-process", "G1c-realtime"],
    "G1c-realtime": ["G1-realtime"],
    "G1": ["G1-process"],
    "G1-process": ["G1-realtime"],
    "G-single": ["G2-item", "G-single-process"],
    "G-single-process": ["G2-item-process", "G-single-realtime"],
    "G-single-realtime": ["G2-item-realtime"],
    "G2-item": ["G2", "G2-item-process"],
    "G2-item-process": ["G2-process", "G2-item-realtime"],
    "G2-item-realtime": ["G2-realtime"],
    "G2": ["G2-process"],
    "G2-process": ["G2-realtime"],
    "lost-update": ["G2-item"],
    "incompatible-order": ["G1a"],
    "garbage-read": ["G1a"],
    "future-read": ["G1c"],
}

MODELS: dict[str, list[str]] = {
    "strict-serializable": ["serializable", "strong-session-serializable", "snapshot-isolation"],
    "strong-session-serializable": ["serializable"],
    "serializable": ["repeatable-read", "snapshot-isolation"],
    "snapshot-isolation": ["consistent-view", "read-atomic"],
    "consistent-view": ["cursor-stability"],
    "repeatable-read": ["cursor-stability", "monotonic-atomic-view"],
    "read-atomic": ["monotonic-atomic-view"],
    "cursor-stability": ["read-committed"],
    "monotonic-atomic-view": ["read-committed"],
    "read-committed": ["read-uncommitted"],
    "read-uncommitted": [],
}

PROSCRIBES: dict[str, list[str]] = {
    "read-uncommitted": ["G0", "duplicate-elements", "cyclic-versions"],
    "read-committed": ["G1"],
    "cursor-stability": ["G1", "lost-update"],
    "monotonic-atomic-view": ["G1"],
    "consistent-view": ["G1", "G-single"],
    "read-atomic": ["internal", "G1a", "future-read"],
    "repeatable-read": ["G1", "G2-item", "lost-update"],
    "snapshot-isolation": ["internal", "G1", "G-single"],
    "serializable": ["internal", "G1", "G2"],
    "strong-session-serializable": ["G1-process", "G2-process"],
    "strict-serializable": ["G1", "G1c-realtime", "G2-realtime"],
}

MODEL_NAMES = tuple(MODELS)
ANOMALY_NAMES = tuple(sorted({a for k, vs in IMPLIED_ANOMALIES.items() for a in (k, *vs)}
                             | {a for vs in PROSCRIBES.values() for a in vs}))


def _closure(start: Iterable[str], edges: dict[str, list[str]]) -> set[str]:
    seen: set[str] = set()
    todo = list(start)
    while todo:
        x = todo.pop()
        if x not in seen:
            seen.add(x)
            todo.extend(edges.get(x, ()))
    return seen


def implied_anomalies(anomalies: Iterable[str]) -> set[str]:
    """The anomalies and everything they imply."""
    return _closure(anomalies, IMPLIED_ANOMALIES)


_IMPLIED_BY: dict[str, list[str]] = {}
for _m, _weaker in MODELS.items():
    for _w in _weaker:
        _IMPLIED_BY.setdefault(_w, []).append(_m)


def impossible_models(anomalies: Iterable[str]) -> set[str]:
    """Every model (of ``MODELS``) that cannot hold given these anomalies."""
    found = implied_anomalies(anomalies)
    direct = [m for m, bad in PROSCRIBES.items() if found.intersection(bad)]
    return _closure(direct, _IMPLIED_BY)


def boundary(anomalies: Iterable[str]) -> tuple[list[str], list[str]]:
    """``(not, also_not)``: the weakest impossible models, then the other impossible ones."""
    bad = impossible_models(anomalies)
    weakest = sorted(m for m in bad if not (_closure(MODELS[m], MODELS) & bad))
    return weakest, sorted(bad - set(weakest))


def prohibits(model: str, anomaly: str) -> bool:
    """True if ``model`` cannot hold in a history with ``anomaly``."""
    if model not in MODELS:
        raise ValueError(f"unknown consistency model {model!r} (expected one of {', '.join(MODEL_NAMES)})")
    return model in impossible_models([anomaly])
