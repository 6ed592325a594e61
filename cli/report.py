"""``fedmoe report``: the comparison table and plots of a run folder."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from fedmoe.errors import UsageError
from fedmoe.io.manifest import dumps

if TYPE_CHECKING:
    pass

from .common import Json, Quiet, emit, handle_errors, pct, stderr_console

HELP = """Rebuild report.json of a run folder, print the comparison table on stderr and write the
plots (accuracy.png, traffic.png, affinity.png, sync_graph.png; needs fedmoe[plot]).

Example:

  fedmoe report runs/quickstart
"""


def make_report(run_dir: Path, console: Any, plots: bool = True) -> tuple[Path, dict[str, Any]]:
    """Write ``report.json`` (and the plots) for ``run_dir``; print the table."""
    from fedmoe.io.atomic import write_atomic
    from fedmoe.run.report import build_report, read_metrics, run_context, write_plots

    rows = read_metrics(run_dir)
    recipe, domain_names = run_context(run_dir)
    report = build_report(rows, recipe, domain_names)
    path = run_dir / "report.json"
    write_atomic(path, dumps(report).encode(), force=True)
    print_table(console, report)
    if plots:
        try:
            written = write_plots(run_dir, report)
            console.print("plots: " + ", ".join(p.name for p in written))
        except UsageError as exc:
            console.print(f"[yellow]no plots: {exc.message} ({exc.hint})[/yellow]")
    return path, report


def print_table(console: Any, report: dict[str, Any]) -> None:
    """The comparison table: accuracy and traffic per method."""
    if console.quiet:
        return
    table = Table(
        title="fedmoe run: accuracy % (local = each client on its own test split), MiB per round",
        title_justify="left",
    )
    attacked = any(d.get("attack") for d in report["methods"].values())
    cols = ["method", "local", "worst", "global", "server", "p2p", "÷FedAvg", "s"]
    if attacked:
        cols[4:4] = ["drop"]
    for col in cols:
        table.add_column(col, justify="left" if col == "method" else "right", no_wrap=True)
    for m, d in report["methods"].items():
        fedavg = d["fedavg_bytes_per_round"] or 1
        drop = d.get("drop_vs_clean")
        extra = [pct(drop) if drop is not None else "-"] if attacked else []
        table.add_row(
            m,
            pct(d["mean_local_acc"]),
            pct(d["worst_local_acc"]),
            pct(d["mean_global_acc"]),
            *extra,
            f"{d['server_bytes_per_round'] / 2**20:.3f}",
            f"{d['p2p_bytes_per_round'] / 2**20:.3f}",
            f"{d['server_bytes_per_round'] / fedavg:.2f}",
            f"{d['wall_seconds']:.1f}",
        )
    console.print(table)


def report(
    run_dir: Annotated[Path, typer.Argument(help="A run folder written by fedmoe run.")],
    json_: Json = False,
    quiet: Quiet = False,
) -> None:
    console = stderr_console(quiet)
    path, data = make_report(run_dir, console)
    emit(path, data, json_)


command = handle_errors(report)
