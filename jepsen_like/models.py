"""Sequential specifications for the linearizability checker (Porcupine style).

A model is pure: ``init()`` gives the initial state, ``step(state, input,
output) -> (ok, new_state)`` says whether an operation with that input may
return that output in ``state`` (and the state afterwards), and
``partition(ops)`` splits a history into independent sub-histories
(P-compositionality: a history is linearizable iff every partition is).
States must be hashable and are never mutated.

Two more hooks feed the checker:

* ``encode(op) -> (input, output) | None`` turns a history :class:`Op` into the
  model's input/output; ``None`` drops the op (it can neither affect the state
  nor be observed, e.g. an indeterminate read).  Indeterminate ops get
  ``output = UNKNOWN``; a model's step must accept any state for them (it only
  decides *how* the state changes), so they may always be linearized last.
* ``compile(input, output)`` returns a one-argument function ``state ->
  new_state`` or ``ILLEGAL``; the search calls it in its inner loop, so it is a
  precomputed closure instead of a generic ``step`` with branches.

Models: :class:`KVModel` (register / per-key map with get/put/cas/delete and
append; ``None`` = absent), the etcd register of the corpus and the corpus kv
append model are instances of it; :class:`ExpiringKVModel` (the same registers
where a write may carry a time to live); :class:`TxnModel` for multi-key
transactions; :class:`MutexModel` for locks (acquire / release, as Knossos's
mutex).

Knossos's models, with Knossos's semantics (for histories read from its EDN
format, :func:`knossos_model`): :class:`CASRegister` (``cas-register``: one
register, read / write / cas, starts at 0), :class:`MultiRegister`
(``multi-register``: transactions of reads and writes over several registers,
every register starts at 0) and :class:`MutexModel` without owners.  In all of
them an ``ok`` read of ``nil`` constrains nothing (Knossos: "we don't know
what the read was"), a ``fail`` op had no effect, an ``info`` op may or may not
have taken effect, and an ``ok`` op's value is its completion's value.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

from .history import UNKNOWN, Op

__all__ = [
    "ILLEGAL",
    "Model",
    "KVModel",
    "ExpiringKVModel",
    "TxnModel",
    "MutexModel",
    "CASRegister",
    "MultiRegister",
    "MODEL_NAMES",
    "KNOSSOS_MODEL_NAMES",
    "knossos_model",
    "get_model",
    "default_model_for",
]


class _Illegal:
    def __repr__(self) -> str:
        return "ILLEGAL"


ILLEGAL: Any = _Illegal()
"""Returned by compiled steps when the output is impossible in that state."""

Transition = Callable[[Any], Any]


def freeze(v: Any) -> Any:
    """Make JSON values hashable: lists become tuples, dicts sorted item tuples."""
    if isinstance(v, list | tuple):
        return tuple(freeze(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, freeze(x)) for k, x in v.items()))
    return v


def by_key(ops: Sequence[Op]) -> list[list[Op]]:
    """The sub-histories of each key (P-compositionality for objects that are one per key)."""
    parts: dict[Any, list[Op]] = {}
    for op in ops:
        parts.setdefault(freeze(op.key), []).append(op)
    return list(parts.values())


class Model:
    """Base class: subclasses implement ``init``, ``encode`` and ``compile``."""

    name = "model"

    def init(self) -> Hashable:
        """The initial state."""
        raise NotImplementedError

    def encode(self, op: Op) -> tuple[Any, Any] | None:
        """Model input/output for ``op``; ``None`` when the op constrains nothing."""
        raise NotImplementedError

    def compile(self, input: Any, output: Any) -> Transition:
        """A function ``state -> new_state | ILLEGAL`` for this input/output."""
        raise NotImplementedError

    def step(self, state: Any, input: Any, output: Any) -> tuple[bool, Any]:
        """Porcupine's ``Step``: ``(ok, new_state)``; the state is unchanged when not ok."""
        new = self.compile(input, output)(state)
        return (False, state) if new is ILLEGAL else (True, new)

    def partition(self, ops: Sequence[Op]) -> list[list[Op]]:
        """Independent sub-histories; the default is the whole history."""
        return [list(ops)] if ops else []

    def describe_state(self, state: Any) -> str:
        """Short text for a state (used in reports)."""
        return repr(state)


# ---------------------------------------------------------------- key-value / register

_READ = {"get", "read", "r"}
_WRITE = {"put", "write", "set", "w"}
_DELETE = {"delete", "del", "remove"}


class KVModel(Model):
    """A register per key: get/read, put/write, cas, delete, append.

    * ``get`` must return the current value (``None`` = absent / never written);
    * ``put v`` sets it; ``delete`` makes it absent; ``append s`` concatenates
      (absent counts as ``""``);
    * ``cas [expected, new]``: a completed cas succeeded (value was
      ``expected``, now ``new``) unless its output is ``False``, in which case
      the value was not ``expected`` and nothing changed; an indeterminate cas
      changes the value only if the compare matches.

    ``partitioned=True`` checks every key alone (P-compositionality), else the
    whole history is one register and keys are ignored.  ``initial`` is every
    key's starting value (``""`` for Porcupine's kv data).
    """

    def __init__(self, name: str = "kv", initial: Any = None, partitioned: bool = True) -> None:
        self.name = name
        self.initial = initial
        self.partitioned = partitioned

    def __repr__(self) -> str:
        return f"KVModel(name={self.name!r}, initial={self.initial!r}, partitioned={self.partitioned})"

    def init(self) -> Any:
        return self.initial

    def partition(self, ops: Sequence[Op]) -> list[list[Op]]:
        if not self.partitioned:
            return super().partition(ops)
        return by_key(ops)

    def encode(self, op: Op) -> tuple[Any, Any] | None:
        if op.status == "fail":
            return None
        f = op.f
        out = op.output if op.status == "ok" else UNKNOWN
        if f in _READ:
            return None if out is UNKNOWN else (("get",), freeze(out))
        if f in _WRITE:
            return ("put", freeze(op.input)), None
        if f == "append":
            return ("append", op.input), None
        if f in _DELETE:
            return ("delete",), None
        if f == "cas":
            exp, new = op.input
            if out is not UNKNOWN:
                out = out if isinstance(out, bool) else True
            return ("cas", freeze(exp), freeze(new)), out
        raise ValueError(f"{self.name} model: unsupported operation {f!r} in {op.describe()}")

    def compile(self, input: Any, output: Any) -> Transition:
        kind = input[0]
        illegal = ILLEGAL
        if kind == "get":
            out = output
            return lambda s: s if s == out else illegal
        if kind == "put":
            v = input[1]
            return lambda s: v
        if kind == "append":
            a = input[1]
            return lambda s: a if s is None else s + a
        if kind == "delete":
            return lambda s: None
        if kind == "cas":
            exp, new = input[1], input[2]
            if output is UNKNOWN:
                return lambda s: new if s == exp else s
            if output:
                return lambda s: new if s == exp else illegal
            return lambda s: s if s != exp else illegal
        raise ValueError(f"unknown input {input!r}")


# ---------------------------------------------------------------- registers with expiry

# One possible state of an expiring register: (value, may_vanish); ``(None, False)`` is absent.
_ABSENT = (None, False)


class ExpiringKVModel(Model):
    """Per-key registers whose writes may expire, checked without knowing when (the store's log time).

    Operations are :class:`KVModel`'s (get, put, cas, delete) plus ``put-ttl`` with input
    ``[value, ttl_ms]`` (``SET k v PX ttl_ms``).  A value put with a ttl shorter than ``forever_ms`` *may
    vanish* at any later moment: a read may return it or ``None``, and once the key is gone it stays gone
    until the next write.  A value put without a ttl, with a ttl of at least ``forever_ms`` (longer than any
    run), or by a successful ``cas`` (a write clears the deadline, as in Redis) never vanishes.  A ``cas``
    against a vanished key behaves as against an absent one.

    Vanishing is a silent step, so the model tracks every state the register may be in: a state is a
    frozenset of ``(value, may_vanish)`` pairs.  Before each operation any may-vanish pair may also have
    become absent; the operation then keeps the pairs whose outcome matches the output (ILLEGAL if none
    does).  So a read of ``None`` after a short-ttl put keeps only "absent", a read of the value keeps
    only the value, and an indeterminate cas keeps both outcomes when the value may or may not have
    vanished first.  A set holding a may-vanish pair leaves "absent" implicit (normalized away), so equal
    possibilities are one state for the search's memo.
    """

    name = "kv-expiry"

    def __init__(self, forever_ms: int = 3_600_000) -> None:
        self.forever_ms = forever_ms

    def __repr__(self) -> str:
        return f"ExpiringKVModel(forever_ms={self.forever_ms})"

    def init(self) -> Any:
        return frozenset({_ABSENT})

    def partition(self, ops: Sequence[Op]) -> list[list[Op]]:
        return by_key(ops)

    def encode(self, op: Op) -> tuple[Any, Any] | None:
        if op.f == "put-ttl":
            if op.status == "fail":
                return None
            value, ttl_ms = op.input
            return ("put", freeze(value), ttl_ms < self.forever_ms), None
        if op.f == "append":
            raise ValueError(f"{self.name} model: unsupported operation {op.f!r} in {op.describe()}")
        enc = _KV.encode(op)
        if enc is not None and enc[0][0] == "put":
            return ("put", enc[0][1], False), enc[1]
        return enc

    def compile(self, input: Any, output: Any) -> Transition:
        kind = input[0]
        if kind == "get":
            out = output

            def one(c: tuple) -> tuple | None:
                return c if c[0] == out else None
        elif kind == "put":
            after = (input[1], input[2])

            def one(c: tuple) -> tuple | None:
                return after
        elif kind == "delete":

            def one(c: tuple) -> tuple | None:
                return _ABSENT
        elif kind == "cas":
            exp, new = (input[1], False), (input[2], False)
            if output is UNKNOWN:

                def one(c: tuple) -> tuple | None:
                    return new if c[0] == exp[0] else c
            elif output:

                def one(c: tuple) -> tuple | None:
                    return new if c[0] == exp[0] else None
            else:

                def one(c: tuple) -> tuple | None:
                    return c if c[0] != exp[0] else None
        else:
            raise ValueError(f"unknown input {input!r}")
        illegal = ILLEGAL

        def step(state: frozenset) -> Any:
            maybe = set(state)
            if any(c[1] for c in state):
                maybe.add(_ABSENT)  # a may-vanish value may be gone by now
            after = {n for c in maybe if (n := one(c)) is not None}
            if not after:
                return illegal
            if len(after) > 1 and any(c[1] for c in after):
                after.discard(_ABSENT)  # implied by the may-vanish pair
            return frozenset(after)

        return step

    def describe_state(self, state: Any) -> str:
        return " or ".join(sorted(("absent" if c == _ABSENT else f"{c[0]!r}" + (" (may vanish)" if c[1] else ""))
                                  for c in state))


_KV = KVModel()


# ---------------------------------------------------------------- multi-key transactions


def _micro(m: Any) -> tuple[bool, Any, Any]:
    kind, key, val = m
    if kind in ("r", "read", "get"):
        return False, freeze(key), freeze(val)
    if kind in ("w", "write", "put"):
        return True, freeze(key), freeze(val)
    raise ValueError(f"unknown micro-op {m!r}")


class TxnModel(Model):
    """Strictly serializable multi-key transactions over registers (``None`` = absent).

    An op's ``input`` is either a list of micro-ops ``[["r", k, None], ["w", k, v]]``
    (completion value: the same list with the values read filled in), or a
    conditional txn ``{"if": [[k, v], ...], "then": [micro-ops], "else": [micro-ops]}``
    (all compares must hold for the then-branch; completion value
    ``{"branch": "then"|"else", "ops": [micro-ops of that branch, reads filled]}``).
    Reads see the txn's own earlier writes.  Plain get/put/delete ops on one key
    are accepted as one-op transactions.  ``partition`` = connected components
    of keys touched by the same op.  State: sorted tuple of ``(key, value)``.
    """

    name = "txn"

    def init(self) -> Any:
        return ()

    @staticmethod
    def keys(op: Op) -> set[Any]:
        """The keys an op touches (reads, writes and compares)."""
        inp = op.input
        if op.f != "txn" and op.key is not None:
            return {freeze(op.key)}
        if isinstance(inp, dict):
            ks = {freeze(c[0]) for c in inp.get("if", ())}
            for br in ("then", "else"):
                ks.update(freeze(m[1]) for m in inp.get(br, ()))
            return ks
        return {freeze(m[1]) for m in inp or ()}

    def partition(self, ops: Sequence[Op]) -> list[list[Op]]:
        parent: dict[Any, Any] = {}

        def find(k: Any) -> Any:
            while parent[k] != k:
                parent[k] = parent[parent[k]]
                k = parent[k]
            return k

        op_keys = []
        for op in ops:
            ks = self.keys(op)
            op_keys.append(ks)
            for k in ks:
                parent.setdefault(k, k)
            it = iter(ks)
            first = next(it, None)
            for k in it:
                a, b = find(first), find(k)
                if a != b:
                    parent[b] = a
        parts: dict[Any, list[Op]] = {}
        for op, ks in zip(ops, op_keys, strict=True):
            root = find(next(iter(ks))) if ks else ("__nokey__", op.index)
            parts.setdefault(root, []).append(op)
        return list(parts.values())

    def encode(self, op: Op) -> tuple[Any, Any] | None:
        if op.status == "fail":
            return None
        unknown = op.status != "ok"
        inp, out = op.input, op.output
        if op.f != "txn" and op.key is not None:
            if op.f in _READ:
                if unknown:
                    return None
                inp, out = [["r", op.key, None]], [["r", op.key, out]]
            elif op.f in _WRITE:
                inp, out = [["w", op.key, inp]], None
            elif op.f in _DELETE:
                inp, out = [["w", op.key, None]], None
            else:
                raise ValueError(f"txn model: unsupported operation {op.f!r} in {op.describe()}")
        if isinstance(inp, dict):
            cmps = tuple((freeze(k), freeze(v)) for k, v in inp.get("if", ()))
            then = tuple(_micro(m) for m in inp.get("then", ()))
            els = tuple(_micro(m) for m in inp.get("else", ()))
            if unknown:
                return ("cond", cmps, then, els), UNKNOWN
            if isinstance(out, dict):
                branch = out.get("branch", "then") in ("then", True)
                done = out.get("ops")
            else:
                branch, done = out in ("then", True), None
            micro = then if branch else els
            return ("cond", cmps, then, els), (branch, self._reads(micro, done))
        micro = tuple(_micro(m) for m in inp)
        if unknown:
            return ("txn", micro), UNKNOWN
        return ("txn", micro), self._reads(micro, out)

    @staticmethod
    def _reads(micro: tuple, done: Any) -> tuple | None:
        """Values read, in order; ``None`` when the completion does not say."""
        if not isinstance(done, list | tuple) or len(done) != len(micro):
            return None
        return tuple(freeze(d[2]) for m, d in zip(micro, done, strict=True) if not m[0])

    def compile(self, input: Any, output: Any) -> Transition:
        illegal = ILLEGAL

        def run(state: Any, micro: tuple, reads: tuple | None) -> Any:
            d = dict(state)
            i = 0
            for is_write, k, v in micro:
                if is_write:
                    if v is None:
                        d.pop(k, None)
                    else:
                        d[k] = v
                else:
                    if reads is not None and d.get(k) != reads[i]:
                        return illegal
                    i += 1
            return tuple(sorted(d.items()))

        if input[0] == "txn":
            micro = input[1]
            reads = None if output is UNKNOWN else output
            return lambda s: run(s, micro, reads)
        _, cmps, then, els = input

        def cond(s: Any) -> Any:
            d = dict(s)
            holds = all(d.get(k) == v for k, v in cmps)
            if output is UNKNOWN:
                return run(s, then if holds else els, None)
            branch, reads = output
            if holds != branch:
                return illegal
            return run(s, then if holds else els, reads)

        return cond


# ---------------------------------------------------------------- locks


class MutexModel(Model):
    """A mutex per key (Knossos's ``mutex``, with owners): ``acquire`` and ``release``.

    The state is the holding process, or ``None``.  A completed ``acquire`` needs
    the mutex free and takes it; a completed ``release`` needs the caller to hold
    it and frees it.  So two ``ok`` acquires by different processes with no
    release between them cannot be linearized: two holders at once.  An
    indeterminate acquire takes the mutex only if it is free, an indeterminate
    release frees it only if the caller holds it (either may also never happen,
    which the search covers by linearizing it last).  A holder that lost its lock
    without releasing it (a lease that lapsed) records its release as ``info``:
    the mutex is free only from the release's invocation on, so an acquire by
    someone else before that is the violation it is.
    """

    name = "mutex"

    def __init__(self, owners: bool = True) -> None:
        # Knossos's mutex has no owners: any process may release a held mutex.
        self.owners = owners

    def __repr__(self) -> str:
        return f"MutexModel(owners={self.owners})"

    def init(self) -> Any:
        return None

    def partition(self, ops: Sequence[Op]) -> list[list[Op]]:
        return by_key(ops)

    def encode(self, op: Op) -> tuple[Any, Any] | None:
        if op.status == "fail":
            return None
        if op.f not in ("acquire", "release"):
            raise ValueError(f"mutex model: unsupported operation {op.f!r} in {op.describe()}")
        who = freeze(op.client) if self.owners else "held"
        return (op.f, who), (UNKNOWN if op.status != "ok" else True)

    def compile(self, input: Any, output: Any) -> Transition:
        kind, who = input
        illegal = ILLEGAL
        if kind == "acquire":
            if output is UNKNOWN:
                return lambda s: who if s is None else s
            return lambda s: who if s is None else illegal
        if output is UNKNOWN:
            return lambda s: None if s == who else s
        return lambda s: None if s == who else illegal


# ---------------------------------------------------------------- Knossos's registers


def _completed_value(op: Op) -> Any:
    """Knossos's value of an op: the completion's for an ``ok`` op, else the invocation's."""
    return op.output if op.status == "ok" else op.input


class CASRegister(KVModel):
    """Knossos's ``cas-register``: one register with ``read``, ``write`` and ``cas [old new]``.

    It starts at ``initial`` (0, as ``(cas-register 0)`` in Knossos's tests and Jepsen's register
    tests).  An ``ok`` read of ``nil`` constrains nothing; an ``ok`` cas succeeded (a cas whose
    compare failed is recorded as ``fail``, which had no effect); an ``info`` write or cas may or may
    not have happened.  Keys are ignored: a Knossos history is one object.
    """

    def __init__(self, initial: Any = 0) -> None:
        super().__init__("cas-register", freeze(initial), partitioned=False)

    def __repr__(self) -> str:
        return f"CASRegister(initial={self.initial!r})"

    def encode(self, op: Op) -> tuple[Any, Any] | None:
        if op.status == "fail":
            return None
        value = freeze(_completed_value(op))
        known = op.status == "ok"
        if op.f in _READ:
            return (("get",), value) if known and value is not None else None
        if op.f in _WRITE:
            return ("put", value), None
        if op.f == "cas":
            if not (isinstance(value, tuple) and len(value) == 2):
                raise ValueError(f"cas-register: a cas value is [old new], not {value!r} in {op.describe()}")
            return ("cas", value[0], value[1]), (True if known else UNKNOWN)
        raise ValueError(f"cas-register model: unsupported operation {op.f!r} in {op.describe()} "
                         "(read, write, cas)")


def _mops(op: Op, value: Any) -> tuple[tuple[bool, Any, Any], ...]:
    if not isinstance(value, list | tuple):
        raise ValueError(f"multi-register: a transaction is a list of [f k v], not {value!r} in {op.describe()}")
    out = []
    for m in value:
        if not (isinstance(m, list | tuple) and len(m) == 3):
            raise ValueError(f"multi-register: micro-op {m!r} is not [f k v] in {op.describe()}")
        f, k, v = m
        if f in ("r", "read"):
            out.append((False, freeze(k), freeze(v)))
        elif f in ("w", "write"):
            out.append((True, freeze(k), freeze(v)))
        else:
            raise ValueError(f"multi-register: micro-op {m!r} is neither a read nor a write in {op.describe()}")
    return tuple(out)


class MultiRegister(TxnModel):
    """Knossos's ``multi-register``: transactions of ``[:read k v]`` / ``[:write k v]`` (or ``:r`` / ``:w``).

    Every register starts at ``initial`` (0).  A read sees the transaction's own earlier writes; a read of
    ``nil`` constrains nothing; an indeterminate transaction's reads constrain nothing (its writes may or
    may not have happened).  The op's ``f`` does not matter (``:txn`` in Knossos, ``:read`` / ``:write``
    in some Jepsen tests).  Partitions: connected components of the registers ops touch together.  State:
    a frozenset of ``(key, value)`` pairs of the registers written so far.
    """

    name = "multi-register"

    def __init__(self, initial: Any = 0) -> None:
        self.initial = freeze(initial)

    def __repr__(self) -> str:
        return f"MultiRegister(initial={self.initial!r})"

    def init(self) -> Any:
        return frozenset()

    def keys(self, op: Op) -> set[Any]:
        return {m[1] for m in _mops(op, _completed_value(op))}

    def encode(self, op: Op) -> tuple[Any, Any] | None:
        if op.status == "fail":
            return None
        known = op.status == "ok"
        micro = tuple(m for m in _mops(op, _completed_value(op)) if m[0] or (known and m[2] is not None))
        if not micro:
            return None
        return ("txn", micro), (None if known else UNKNOWN)

    def compile(self, input: Any, output: Any) -> Transition:
        micro = input[1]
        initial = self.initial
        illegal = ILLEGAL

        def step(state: frozenset) -> Any:
            d = dict(state)
            for is_write, k, v in micro:
                if is_write:
                    d[k] = v
                elif d.get(k, initial) != v:
                    return illegal
            return frozenset(d.items())

        return step

    def describe_state(self, state: Any) -> str:
        d = dict(state)
        return "{" + ", ".join(f"{k!r}: {d[k]!r}" for k in sorted(d, key=repr)) + f"}} (others {self.initial!r})"


KNOSSOS_MODEL_NAMES = ("cas-register", "multi-register", "mutex")


def knossos_model(name: str, initial: Any = 0) -> Model:
    """A model with Knossos's semantics (for histories in its EDN format); ``initial`` for the registers."""
    if name == "cas-register":
        return CASRegister(initial)
    if name == "multi-register":
        return MultiRegister(initial)
    if name == "mutex":
        return MutexModel(owners=False)
    raise ValueError(f"no Knossos model {name!r} (expected one of {', '.join(KNOSSOS_MODEL_NAMES)})")


# ---------------------------------------------------------------- registry

MODEL_NAMES = ("register", "kv", "kv-append", "kv-expiry", "etcd", "txn", "mutex", "cas-register", "multi-register")


def get_model(name: str) -> Model:
    """A fresh model by name (see ``MODEL_NAMES``)."""
    if name == "register":
        return KVModel("register", None, partitioned=False)
    if name == "kv":
        return KVModel("kv", None, partitioned=True)
    if name in ("kv-append", "append"):
        return KVModel("kv-append", "", partitioned=True)
    if name == "etcd":
        return KVModel("etcd", None, partitioned=False)
    if name == "kv-expiry":
        return ExpiringKVModel()
    if name == "txn":
        return TxnModel()
    if name == "mutex":
        return MutexModel()
    if name in ("cas-register", "multi-register"):
        return knossos_model(name)
    raise ValueError(f"unknown model {name!r} (expected one of {', '.join(MODEL_NAMES)})")


def default_model_for(fmt: str) -> Model:
    """The model that fits a history format: jepsen-log -> etcd, porcupine-kv -> kv-append, jsonl -> kv."""
    return get_model({"jepsen-log": "etcd", "porcupine-kv": "kv-append"}.get(fmt, "kv"))
