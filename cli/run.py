"""``fedmoe run``: a whole federation from a YAML recipe, every method side by side."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedmoe.errors import OutputError
from fedmoe.run import load_recipe
from fedmoe.run.orchestrator import (
    check_resume,
    completed_rounds,
    prepare,
    run_method,
    write_setup,
)
from fedmoe.train.pool import TrainPool, default_workers

from .common import Force, Json, Quiet, emit, handle_errors, parse_overrides, stderr_console
from .report import make_report

HELP = """Run a whole federation from a recipe: partition → initial model → rounds of
(train → affinity → plan → aggregate) → evaluation, for every method of the recipe on the same
split and initial model, then write report.json, the comparison table and the plots.

Clients train in --workers processes (default: one per core), each on one torch thread; results
do not depend on the number of workers. The run folder gets recipe.yaml (resolved), partition.json, init.safetensors, metrics.jsonl (one
line per method and round), plans/ (FedMoE-DA sync plans), state/<method>/round-XXX/ (the latest
client checkpoints), report.json and PNG plots. --resume continues an interrupted run from its last
complete round, with the same result as an uninterrupted run.

Examples:

  fedmoe run recipes/quickstart.yaml --out runs/quickstart

  fedmoe run recipes/quickstart.yaml --out runs/p2 -c fedmoe.top_p=2 -c rounds=10

  fedmoe run recipes/quickstart.yaml --out runs/quickstart --resume
"""

RUN_FILES = (
    "metrics.jsonl",
    "report.json",
    "recipe.yaml",
    "partition.json",
    "init.safetensors",
    "affinity.json",
    "accuracy.png",
    "traffic.png",
    "affinity.png",
    "sync_graph.png",
)
RUN_DIRS = ("state", "plans")


def run(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder.")] = Path("runs/run"),
    config: Annotated[
        list[str] | None, typer.Option("--config", "-c", help="Override: section.key=value.")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run in --out.")] = False,
    workers: Annotated[
        int | None,
        typer.Option(help="Client-training processes, one thread each (default: one per core)."),
    ] = None,
    threads: Annotated[
        int | None, typer.Option(help="Torch threads for evaluation and merging (default: all).")
    ] = None,
    force: Force = False,
    json_: Json = False,
    quiet: Quiet = False,
) -> None:
    console = stderr_console(quiet)
    torch.set_num_threads(threads or max(1, os.cpu_count() or 1))
    rec, _ = load_recipe(recipe, parse_overrides(config))
    resolved = rec.to_dict()
    started = out.is_dir() and any((out / f).exists() for f in (*RUN_FILES, *RUN_DIRS))
    if resume:
        check_resume(out, resolved)
    elif started and not force:
        raise OutputError(
            f"{out} already holds a run; pass --resume to continue it or --force to start over",
        )
    elif started:
        for name in RUN_DIRS:
            shutil.rmtree(out / name, ignore_errors=True)
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
    ctx = prepare(rec, out)
    if not resume:
        write_setup(ctx, resolved)
    done = completed_rounds(out / "metrics.jsonl") if resume else {}
    progress = Progress(
        TextColumn("{task.description:>14}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[acc]}"),
        TimeElapsedColumn(),
        console=console,
        disable=quiet or not console.is_terminal,
    )
    tasks: dict[str, Any] = {}

    def update(method: str, rnd: int, total: int, row: dict[str, Any]) -> None:
        acc = row.get("mean_local_acc")
        progress.update(
            tasks[method], completed=rnd, acc="" if acc is None else f"local acc {100 * acc:.1f}%"
        )

    with TrainPool(ctx.spec, ctx.dataset, workers or default_workers()) as pool, progress:
        if pool.fallback:
            console.print(f"[yellow]note: {pool.fallback}[/yellow]")
        for method in rec.methods:
            tasks[method] = progress.add_task(
                method, total=rec.rounds, acc="", completed=done.get(method, 0)
            )
        for method in rec.methods:
            start = done.get(method, 0)
            if start < rec.rounds:
                run_method(ctx, method, start, update, pool)
            if progress.disable and not quiet:  # no live bar (not a terminal): one line each
                console.print(f"{method}: {rec.rounds} rounds done")
    path, report = make_report(out, console)
    emit(path, report, json_)


command = handle_errors(run)
