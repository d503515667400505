"""Self-contained HTML timeline of a history (no JavaScript, no network).

One section per key, one lane per client; every operation is a box from its
invocation to its return (indeterminate ops run to the end of the section,
hatched), failed ops are dashed and grey, the ops the checker could not
linearize are red, and ops of the longest linearizable prefix carry their
position in it.  Hovering a box shows its details (``title``).  The x axis is
the rank of the event positions within the section, so dense and sparse
periods are equally readable.

:func:`render_timeline` is pure (returns a string); :func:`write_timeline`
writes it to a file.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .history import UNKNOWN, Op

__all__ = ["render_timeline", "write_timeline"]

_STEP_PX = 14
_LANE_PX = 24
_LABEL_PX = 90

_CSS = """
body{font:13px/1.4 system-ui,sans-serif;margin:16px;color:#222}
h1{font-size:18px} h2{font-size:15px;margin:18px 0 4px}
.meta{color:#555;margin-bottom:8px}
.scroll{overflow-x:auto;border:1px solid #ddd;background:#fafafa}
.lanes{position:relative}
.lane{position:absolute;left:0;right:0;border-bottom:1px solid #eee}
.lbl{position:absolute;left:4px;width:80px;color:#666;font-size:11px;overflow:hidden;white-space:nowrap}
.op{position:absolute;height:16px;border:1px solid #4a7;background:#bfe3cc;border-radius:3px;
font-size:10px;overflow:hidden;white-space:nowrap;box-sizing:border-box;padding:0 2px;cursor:default}
.op:hover{outline:2px solid #333;z-index:2}
.info{background:repeating-linear-gradient(45deg,#e7e0b8,#e7e0b8 4px,#f6f1d5 4px,#f6f1d5 8px);border-color:#b9a84a}
.fail{background:#eee;border:1px dashed #999;color:#888}
.bad{background:#f4a3a3;border:2px solid #c00;color:#700;font-weight:bold}
.legend span{display:inline-block;padding:0 6px;margin-right:6px;border-radius:3px}
"""


def _fmt(v: Any) -> str:
    return "?" if v is UNKNOWN else repr(v)


def render_timeline(
    ops: Sequence[Op],
    failing_ops: Sequence[Op] = (),
    longest_prefix: Sequence[Op] = (),
    title: str = "History timeline",
    verdict: str = "",
) -> str:
    """Return a complete HTML document showing ``ops`` per key and client."""
    bad = {op.index for op in failing_ops}
    order = {op.index: i + 1 for i, op in enumerate(longest_prefix)}
    sections: dict[Any, list[Op]] = {}
    for op in ops:
        k = op.key if op.key is None or isinstance(op.key, str | int | float) else repr(op.key)
        sections.setdefault(k, []).append(op)
    keys = sorted(sections, key=lambda k: (not any(o.index in bad for o in sections[k]), str(k)))
    out = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<div class='meta'>{len(ops)} operations, {len(sections)} keys"
        + (f"; verdict: <b>{html.escape(verdict)}</b>" if verdict else "")
        + (f"; {len(bad)} operation(s) could not be linearized (red); longest linearizable prefix: "
           f"{len(longest_prefix)} ops (numbered)" if bad else "")
        + "</div>",
        "<div class='legend'><span class='op' style='position:static'>ok</span>"
        "<span class='op info' style='position:static'>info (open to the end)</span>"
        "<span class='op fail' style='position:static'>fail (no effect)</span>"
        "<span class='op bad' style='position:static'>not linearizable</span></div>",
    ]
    for k in keys:
        out.append(_section(k, sections[k], bad, order))
    out.append("</body></html>\n")
    return "\n".join(out)


def _section(key: Any, ops: list[Op], bad: set[int], order: dict[int, int]) -> str:
    finite = sorted({p for op in ops for p in (op.call, op.ret) if p != math.inf})
    rank = {p: i for i, p in enumerate(finite)}
    end = len(finite) + 1
    clients = sorted({op.client for op in ops}, key=lambda c: (str(type(c)), c))
    lane = {c: i for i, c in enumerate(clients)}
    width = _LABEL_PX + (end + 1) * _STEP_PX
    height = len(clients) * _LANE_PX + 4
    name = "(no key)" if key is None else f"key {key!r}"
    rows = [
        f"<h2>{html.escape(name)}</h2><div class='scroll'>"
        f"<div class='lanes' style='width:{width}px;height:{height}px'>"
    ]
    for c, i in lane.items():
        rows.append(
            f"<div class='lane' style='top:{i * _LANE_PX}px;height:{_LANE_PX}px'>"
            f"<span class='lbl' style='top:4px'>client {html.escape(str(c))}</span></div>"
        )
    for op in ops:
        x0 = _LABEL_PX + rank[op.call] * _STEP_PX
        x1 = _LABEL_PX + (end if op.ret == math.inf else rank[op.ret]) * _STEP_PX + _STEP_PX
        cls = "op"
        if op.status == "info":
            cls += " info"
        elif op.status == "fail":
            cls += " fail"
        if op.index in bad:
            cls += " bad"
        num = order.get(op.index)
        tip = op.describe() + (f"\nposition {num} in the longest linearizable prefix" if num else "")
        if op.index in bad:
            tip += "\nCANNOT BE LINEARIZED here"
        label = f"{num}: " if num else ""
        label += f"{op.f} {_fmt(op.input) if op.input is not None else ''}".strip()
        if op.status == "ok" and op.output is not None and op.output != op.input:
            label += f" → {_fmt(op.output)}"
        rows.append(
            f"<div class='{cls}' style='left:{x0}px;width:{x1 - x0}px;top:{lane[op.client] * _LANE_PX + 4}px' "
            f"title='{html.escape(tip, quote=True)}'>{html.escape(label)}</div>"
        )
    rows.append("</div></div>")
    return "\n".join(rows)


def write_timeline(path: str | Path, ops: Sequence[Op], **kwargs: Any) -> Path:
    """Render with :func:`render_timeline` and write to ``path``; return the path."""
    p = Path(path)
    p.write_text(render_timeline(ops, **kwargs), encoding="utf-8")
    return p
