"""``fedmoe report``: the comparison table and plots of a run folder."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from fedmoe.errors import UsageError
from fedmoe.io.manifest import dumps

if TYPE_CHECKING:
    from collections.abc import Callable
    from concurrent.futures import Future

from .common import Force, Json, Quiet, emit, handle_errors, stderr_console

HELP = """Rebuild report.json and metrics.csv of a run folder, print the comparison table on
stderr and write the plots (accuracy.png, traffic.png, affinity.png, sync_graph.png; needs
fedmoe[plot]).

The table marks the best compared method of each accuracy column with * and the reference methods
(oracle-domain, local) with (ref); its caption explains every column and unit. report.json keeps
the table, the command line and environment of the run (from its run.json) and those of the report.

Given several run folders (the same recipe with other seeds, say), also summarise them: per method
the mean, sample standard deviation and each run's value of every quantity, as a table and as
--out FILE (kind run-summary).

Examples:

  fedmoe report runs/quickstart

  fedmoe report runs/s0 runs/s1 runs/s2 --out runs/summary.json
"""


def make_report(
    run_dir: Path,
    console: Any,
    plots: bool = True,
    submit: Callable[..., Future[Any]] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Write ``report.json``, ``metrics.csv`` (and the plots) for ``run_dir``; print the table.
    ``submit``: a process pool's, to draw the plots side by side."""
    from fedmoe.io.atomic import write_atomic
    from fedmoe.io.run_folder import RunFolder
    from fedmoe.run.metrics_csv import metrics_csv
    from fedmoe.run.provenance import read_run_info
    from fedmoe.run.report import build_report, read_metrics, report_environment, run_context

    rows = read_metrics(run_dir)
    recipe, domain_names = run_context(run_dir)
    env = report_environment(sys.argv)
    report = build_report(rows, recipe, domain_names, read_run_info(run_dir), env)
    path = run_dir / "report.json"
    write_atomic(path, dumps(report).encode(), force=True)
    write_atomic(
        RunFolder(run_dir).metrics_csv, metrics_csv(rows, domain_names).encode(), force=True
    )
    print_table(console, report["table"], "fedmoe run")
    if plots:
        from fedmoe.run.figures import write_plots

        try:
            written = write_plots(run_dir, report, submit)
            console.print("plots: " + ", ".join(p.name for p in written))
        except UsageError as exc:
            console.print(f"[yellow]no plots: {exc.message} ({exc.hint})[/yellow]")
    return path, report


def print_table(console: Any, data: dict[str, Any], title: str) -> None:
    """A comparison table (``table`` of a report or a summary, see
    :func:`fedmoe.run.results_table.results_table`): the best cell of each accuracy column bold
    with a ``*``, reference methods with ``(ref)``, the caption under it."""
    from fedmoe.run.results_table import BEST_MARK, REFERENCE_MARK

    if console.quiet:
        return
    table = Table(title=f"{title}: {data['caption'][0]}", title_justify="left",
                  caption="\n".join(data["caption"][1:]), caption_justify="left")  # fmt: skip
    columns = data["columns"]
    for col in columns:
        left = col["key"] == "method"
        table.add_column(col["header"], justify="left" if left else "right", no_wrap=True)
    for row in data["rows"]:
        method = row[0]
        cells = [f"{method} {REFERENCE_MARK}" if method in data["reference"] else method]
        for col, value in zip(columns[1:], row[1:], strict=True):
            best = method in data["best"].get(col["key"], [])
            cells.append(f"[bold]{value}{BEST_MARK}[/bold]" if best else f"{value} ")
        table.add_row(*cells)
    console.print(table)


def report(
    run_dirs: Annotated[
        list[Path], typer.Argument(help="Run folders written by fedmoe run (one or several).")
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Several folders: write their summary here."),
    ] = None,
    force: Force = False,
    json_: Json = False,
    quiet: Quiet = False,
) -> None:
    from fedmoe.io.atomic import check_writable
    from fedmoe.run.report import build_report, combine_reports, read_metrics, run_context

    console = stderr_console(quiet)
    if len(run_dirs) == 1:
        if out is not None:
            raise UsageError("--out is for a summary of several run folders")
        path, data = make_report(run_dirs[0], console)
        emit(path, data, json_)
        return
    if out is None:
        raise UsageError("several run folders: give --out FILE for their summary")
    check_writable(out, force)
    reports = [build_report(read_metrics(d), *run_context(d)) for d in run_dirs]  # read only
    summary = combine_reports(reports, [str(d) for d in run_dirs])
    write_summary(summary, out, console, force)
    emit(out, summary, json_)


def write_summary(summary: dict[str, Any], path: Path, console: Any, force: bool) -> None:
    """``path`` (the summary JSON) and, beside it, the same name with ``.png``: accuracy per
    round, mean line and ± one standard deviation band per method; the table on stderr."""
    from fedmoe.io.atomic import write_atomic
    from fedmoe.run.report import summary_plot

    write_atomic(path, dumps(summary).encode(), force=force)
    print_table(console, summary["table"], "fedmoe report")
    try:
        png = path.with_suffix(".png")
        write_atomic(png, summary_plot(summary), force=True)
        console.print(f"plot: {png.name}")
    except UsageError as exc:
        console.print(f"[yellow]no plot: {exc.message} ({exc.hint})[/yellow]")


command = handle_errors(report)
