"""``raftkv-jepsen``: command-line entry point (a click group).

Subcommands live in their own modules and are attached with
``main.add_command(...)``; this module only defines the group and ``check``.

Exit codes of ``check``: 0 linearizable, 1 not linearizable, 2 unknown (time or
state limit reached), 3 the history could not be read.
"""

from __future__ import annotations

from pathlib import Path

import click

from .checker import LINEARIZABLE, NOT_LINEARIZABLE, check_file
from .history import FORMATS, HistoryError
from .models import MODEL_NAMES
from .timeline import write_timeline

EXIT_CODES = {LINEARIZABLE: 0, NOT_LINEARIZABLE: 1}
EXIT_UNKNOWN = 2
EXIT_BAD_INPUT = 3


@click.group()
def main() -> None:
    """Jepsen-like tools for raftkv: history checking (and running tests)."""


@main.command("check")
@click.argument("history", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", type=click.Choice(MODEL_NAMES), default=None,
              help="Model (default: etcd for jepsen-log, kv-append for porcupine-kv, kv for jsonl).")
@click.option("--format", "fmt", type=click.Choice(["auto", *FORMATS]), default="auto", show_default=True)
@click.option("--timeout", "timeout_s", type=float, default=None, help="Give up (verdict unknown) after S seconds.")
@click.option("--max-states", type=int, default=None, help="Give up (verdict unknown) after N search states.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the HTML timeline here (default: <history>.timeline.html, only on a violation).")
def check_cmd(history: Path, model: str | None, fmt: str, timeout_s: float | None,
              max_states: int | None, html_path: Path | None) -> None:
    """Check HISTORY for linearizability; exit 0 (yes), 1 (no) or 2 (unknown)."""
    try:
        res, ops, fmt = check_file(history, model=model, fmt=fmt, timeout_s=timeout_s, max_states=max_states)
    except (HistoryError, ValueError, OSError) as e:
        click.echo(f"error: cannot check {history}: {e}", err=True)
        raise SystemExit(EXIT_BAD_INPUT) from e
    click.echo(f"{history}: {res.verdict.replace('_', ' ').upper()}")
    click.echo(f"  format {fmt}, model {res.model}, {len(ops)} ops; {res.summary()}")
    if res.verdict == NOT_LINEARIZABLE:
        click.echo(f"  operations that cannot be linearized ({len(res.failing_ops)}):")
        for op in res.failing_ops:
            click.echo(f"    {op.describe()}")
        click.echo(f"  longest linearizable prefix: {len(res.longest_prefix)} of {len(res.failed_partition)} ops "
                   "in the failing partition")
    if html_path is None and res.verdict == NOT_LINEARIZABLE:
        html_path = history.with_name(history.name + ".timeline.html")
    if html_path is not None:
        write_timeline(html_path, ops, failing_ops=res.failing_ops, longest_prefix=res.longest_prefix,
                       title=f"{history.name}: {res.verdict}", verdict=res.summary())
        click.echo(f"  timeline: {html_path}")
    raise SystemExit(EXIT_CODES.get(res.verdict, EXIT_UNKNOWN))


if __name__ == "__main__":  # pragma: no cover
    main()
