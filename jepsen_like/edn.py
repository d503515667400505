"""A small, strict EDN reader and writer: what Jepsen and Knossos histories use, nothing more.

Theory of operation
===================

EDN (github.com/edn-format/edn) is the Clojure data syntax Jepsen writes its
histories in.  A history needs only a handful of its forms, and this module
accepts exactly those, refusing anything else with the position and the
reason (a reader that guesses would turn a history it does not understand
into a wrong verdict):

========================  =======================================
EDN                        Python
========================  =======================================
``nil`` ``true`` ``false``  ``None`` ``True`` ``False``
``42`` ``-7`` ``42N``       ``int``
``1.5`` ``-2e3`` ``1.5M``   ``float``
``"text"``                 ``str`` (escapes ``\\" \\\\ \\n \\t \\r \\b \\f \\uXXXX``)
``:read`` ``:jepsen/op``   :class:`Keyword` (a ``str`` subclass: ``Keyword("read") == "read"``)
``[1 2]``                  ``list`` (``Vector``, a tuple, where a hashable value is needed)
``(1 2)``                  ``tuple``
``{:a 1}``                 ``dict``
``#{1 2}``                 ``frozenset``
========================  =======================================

Commas are whitespace, ``;`` starts a comment, ``#_`` discards the next form.
A tagged map ``#some.Record{...}`` (how newer Jepsen prints its ``Op``
records) reads as the map; ``#inst "..."`` and ``#uuid "..."`` read as their
string.  Symbols, characters, ratios, ``##Inf`` / ``##NaN`` and any other tag
are errors.  Map keys and set elements must be hashable: vectors there become
:class:`Vector` (a tuple that writes back as ``[...]``); duplicates are errors,
as in Clojure's reader.

:func:`dumps` writes the same forms back, so ``loads(dumps(x)) == x`` for any
value built from the types above (the property tests check it, types
included).  Both directions are pure functions on strings.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any

__all__ = ["Keyword", "Vector", "EdnError", "loads", "loads_all", "dumps"]


class Keyword(str):
    """An EDN keyword, ``:name`` (without the colon); equal to the plain string of its name."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Keyword({str.__repr__(self)})"


class Vector(tuple):
    """A vector in a hashable position (map key, set element); writes back as ``[...]``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Vector({list(self)!r})"


class EdnError(ValueError):
    """The text is not EDN this reader accepts; the message gives line, column and reason."""


_WS = " \t\r\n,"
_DELIMS = _WS + "()[]{}\";"
_INT = re.compile(r"[+-]?(0|[1-9][0-9]*)N?$")
_FLOAT = re.compile(r"[+-]?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?M?$")
_NAME = re.compile(r"[A-Za-z*!_?$%&=<>.+\-][A-Za-z0-9*!_?$%&=<>.+\-#':]*(/[A-Za-z0-9*!_?$%&=<>.+\-#':]+)?$")
_ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f"}
_CLOSE = {"(": ")", "[": "]", "{": "}"}
_STRING_TAGS = ("inst", "uuid")


class _Reader:
    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0

    def fail(self, msg: str, at: int | None = None) -> EdnError:
        i = self.i if at is None else at
        line = self.s.count("\n", 0, i) + 1
        col = i - (self.s.rfind("\n", 0, i) + 1) + 1
        return EdnError(f"EDN line {line}, column {col}: {msg}")

    def skip(self) -> None:
        s, n = self.s, len(self.s)
        while self.i < n:
            c = s[self.i]
            if c in _WS:
                self.i += 1
            elif c == ";":
                j = s.find("\n", self.i)
                self.i = n if j < 0 else j + 1
            elif s.startswith("#_", self.i):
                self.i += 2
                self.read()  # discarded
            else:
                return

    def at_end(self) -> bool:
        self.skip()
        return self.i >= len(self.s)

    def token(self) -> str:
        j = self.i
        while j < len(self.s) and self.s[j] not in _DELIMS:
            j += 1
        tok = self.s[self.i:j]
        self.i = j
        return tok

    def read(self) -> Any:
        self.skip()
        if self.i >= len(self.s):
            raise self.fail("unexpected end of input")
        c = self.s[self.i]
        if c in "([{":
            start = self.i
            self.i += 1
            items = self.read_seq(_CLOSE[c], start)
            if c == "[":
                return items
            if c == "(":
                return tuple(items)
            return self.make_map(items, start)
        if c in ")]}":
            raise self.fail(f"unmatched {c!r}")
        if c == '"':
            return self.read_string()
        if c == ":":
            start = self.i
            self.i += 1
            name = self.token()
            if not _NAME.match(name):
                raise self.fail(f"bad keyword {':' + name!r}", start)
            return Keyword(name)
        if c == "#":
            return self.read_dispatch()
        if c == "\\":
            raise self.fail("characters (\\c) are not supported in histories")
        start = self.i
        tok = self.token()
        if tok == "nil":
            return None
        if tok in ("true", "false"):
            return tok == "true"
        if _INT.match(tok):
            return int(tok.rstrip("N"))
        if _FLOAT.match(tok):
            return float(tok.rstrip("M"))
        raise self.fail(f"unsupported token {tok!r} (symbols and ratios are not part of a history)", start)

    def read_seq(self, close: str, start: int) -> list[Any]:
        items = []
        while True:
            self.skip()
            if self.i >= len(self.s):
                raise self.fail(f"unclosed {dict(map(reversed, _CLOSE.items()))[close]!r}", start)
            if self.s[self.i] == close:
                self.i += 1
                return items
            items.append(self.read())

    def make_map(self, items: list[Any], start: int) -> dict[Any, Any]:
        if len(items) % 2:
            raise self.fail("a map needs an even number of forms", start)
        out: dict[Any, Any] = {}
        for k, v in zip(items[::2], items[1::2], strict=True):
            k = _hashable(k, self, start)
            if k in out:
                raise self.fail(f"duplicate map key {k!r}", start)
            out[k] = v
        return out

    def read_string(self) -> str:
        s, start = self.s, self.i
        self.i += 1
        out = []
        while True:
            j = self.i
            while j < len(s) and s[j] not in '"\\':
                j += 1
            out.append(s[self.i:j])
            if j >= len(s):
                raise self.fail("unterminated string", start)
            if s[j] == '"':
                self.i = j + 1
                return "".join(out)
            esc = s[j + 1:j + 2]
            if esc in _ESCAPES:
                out.append(_ESCAPES[esc])
                self.i = j + 2
            elif esc == "u" and re.fullmatch(r"[0-9a-fA-F]{4}", s[j + 2:j + 6]):
                out.append(chr(int(s[j + 2:j + 6], 16)))
                self.i = j + 6
            else:
                raise self.fail(f"bad string escape {s[j:j + 2]!r}", j)

    def read_dispatch(self) -> Any:
        start = self.i
        if self.s.startswith("#{", self.i):
            self.i += 2
            items = self.read_seq("}", start)
            out = set()
            for x in items:
                x = _hashable(x, self, start)
                if x in out:
                    raise self.fail(f"duplicate set element {x!r}", start)
                out.add(x)
            return frozenset(out)
        if self.s.startswith("##", self.i):
            raise self.fail("##Inf / ##NaN are not supported in histories", start)
        self.i += 1
        tag = self.token()
        if not _NAME.match(tag):
            raise self.fail(f"bad tag {'#' + tag!r}", start)
        self.skip()
        value = self.read()
        if tag in _STRING_TAGS and isinstance(value, str):
            return value
        if "." in tag and isinstance(value, dict):
            return value  # a record (#jepsen.history.Op{...}): its fields
        raise self.fail(f"unsupported tagged value #{tag} (only records, #inst and #uuid)", start)


def _hashable(x: Any, reader: _Reader, at: int) -> Any:
    if isinstance(x, list):
        return Vector(_hashable(y, reader, at) for y in x)
    if isinstance(x, tuple):
        return type(x)(_hashable(y, reader, at) for y in x)
    if isinstance(x, dict):
        raise reader.fail("a map cannot be a map key or a set element here", at)
    return x


def loads(text: str) -> Any:
    """The one EDN value in ``text`` (raises :class:`EdnError` if there is none, or more than one)."""
    r = _Reader(text)
    value = r.read()
    if not r.at_end():
        raise r.fail("more than one value (use loads_all)")
    return value


def loads_all(text: str) -> Iterator[Any]:
    """Every top-level EDN value in ``text``, in order (a history written one map per line)."""
    r = _Reader(text)
    while not r.at_end():
        yield r.read()


def dumps(x: Any) -> str:
    """``x`` as EDN on one line (maps in insertion order, sets sorted by their text)."""
    if x is None:
        return "nil"
    if x is True:
        return "true"
    if x is False:
        return "false"
    if isinstance(x, Keyword):
        if not _NAME.match(x):
            raise EdnError(f"not a valid keyword name: {str(x)!r}")
        return ":" + x
    if isinstance(x, str):
        return '"' + "".join(_escape(c) for c in x) + '"'
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if not math.isfinite(x):
            raise EdnError(f"{x} has no EDN form a history may use")
        return repr(x)
    if isinstance(x, dict):
        return "{" + ", ".join(f"{dumps(k)} {dumps(v)}" for k, v in x.items()) + "}"
    if isinstance(x, list | Vector):
        return "[" + " ".join(dumps(v) for v in x) + "]"
    if isinstance(x, tuple):
        return "(" + " ".join(dumps(v) for v in x) + ")"
    if isinstance(x, frozenset | set):
        return "#{" + " ".join(sorted(dumps(v) for v in x)) + "}"
    raise EdnError(f"cannot write {type(x).__name__} {x!r} as EDN")


def _escape(c: str) -> str:
    if c == '"':
        return '\\"'
    if c == "\\":
        return "\\\\"
    if c == "\n":
        return "\\n"
    if c == "\t":
        return "\\t"
    if c == "\r":
        return "\\r"
    if ord(c) < 0x20:
        return f"\\u{ord(c):04x}"
    return c
