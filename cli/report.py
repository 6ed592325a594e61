"""``fedmoe report``: the comparison table and plots of a run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from fedmoe.errors import UsageError
from fedmoe.io.manifest import dumps

from .common import Force, Json, Quiet, emit, handle_errors, pct, stderr_console

HELP = """Rebuild report.json of a run folder, print the comparison table on stderr and write the
plots (accuracy.png, traffic.png, affinity.png, sync_graph.png; needs fedmoe[plot]).

Given several run folders (the same recipe with other seeds, say), also summarise them: per method
the mean, sample standard deviation and each run's value of every quantity, as a table and as
--out FILE (kind run-summary).

Examples:

  fedmoe report runs/quickstart

  fedmoe report runs/s0 runs/s1 runs/s2 --out runs/summary.json
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
    print_summary(console, summary)
    try:
        png = path.with_suffix(".png")
        write_atomic(png, summary_plot(summary), force=True)
        console.print(f"plot: {png.name}")
    except UsageError as exc:
        console.print(f"[yellow]no plot: {exc.message} ({exc.hint})[/yellow]")


def print_summary(console: Any, summary: dict[str, Any]) -> None:
    """Mean ± sample standard deviation per method over the runs (accuracies in %)."""
    if console.quiet:
        return
    seeds = ", ".join(str(s) for s in summary["seeds"])
    table = Table(
        title=f"fedmoe report: {len(summary['runs'])} runs (seeds {seeds}); accuracy % as "
        "mean ± std (n − 1), MiB per round",
        title_justify="left",
    )
    for col in ("method", "local", "worst", "global", "drop", "server", "p2p", "n"):
        table.add_column(col, justify="left" if col == "method" else "right", no_wrap=True)

    def acc(q: dict[str, Any] | None) -> str:
        return "-" if q is None else f"{100 * q['mean']:.1f} ± {100 * q['std']:.1f}"

    def mib(q: dict[str, Any] | None) -> str:
        return "-" if q is None else f"{q['mean'] / 2**20:.3f}"

    for m, d in summary["methods"].items():
        n = d["mean_local_acc"]["n"] if d["mean_local_acc"] else 0
        table.add_row(
            m,
            acc(d["mean_local_acc"]),
            acc(d["worst_local_acc"]),
            acc(d["mean_global_acc"]),
            acc(d["drop_vs_clean"]),
            mib(d["server_bytes_per_round"]),
            mib(d["p2p_bytes_per_round"]),
            str(n),
        )
    console.print(table)


command = handle_errors(report)
