"""``fedmoe run``: a whole federation from a YAML recipe, every method side by side."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedmoe.errors import Interrupted, OutputError

if TYPE_CHECKING:
    from fedmoe.pipeline.pool import TrainPool

from .common import (
    Force,
    Json,
    Overrides,
    Quiet,
    RecipeFile,
    emit,
    handle_errors,
    parse_overrides,
    precision_note,
    stderr_console,
)
from .report import make_report

HELP = """Run a whole federation from a recipe: partition → initial model → rounds of
(train → affinity → plan → aggregate) → evaluation, for every method of the recipe on the same
split and initial model, then write report.json, the comparison table and the plots.

Clients train in --workers processes (default: one per core), each on one torch thread; results
do not depend on the number of workers. A recipe whose model: names a family (mixtral, qwen2_moe,
qwen3_moe, olmoe) runs a Hugging Face MoE language model on a text dataset instead: its clients
train in this process on every thread, and runs are scored by per-byte perplexity (lower is
better) instead of accuracy. The run folder gets recipe.yaml (resolved), partition.json,
init.safetensors (init/ for a language model), metrics.jsonl (one line per method and round),
rounds/<method>/round-XXX/ (what the commands write for that round: train/, affinity.json,
plan.json, models/; checkpoints are kept for the latest round only), report.json and PNG plots.
--resume continues an interrupted run from its last complete round, with the same result as an
uninterrupted run. --force over an existing run builds the new run in a hidden folder beside it
and replaces the old run only once the new one is complete: stopped midway, the old run is left as
it was, and --force --resume continues the new one.

Examples:

  fedmoe run recipes/quickstart.yaml --out runs/quickstart

  fedmoe run recipes/quickstart.yaml --out runs/p2 -c fedmoe.top_p=2 -c rounds=10

  fedmoe run recipes/quickstart.yaml --out runs/quickstart --resume

  fedmoe run recipes/quickstart.yaml --out runs/q3 -c "seeds=[0, 1, 2]"

With seeds: [...] in the recipe (or -c), the whole run is made once per seed in --out/seed-S/
(one pool of training processes for all), and --out/summary.json gives per method the mean,
standard deviation and each seed's value (as fedmoe report A B C --out FILE does).
"""


def run(
    recipe: RecipeFile,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder.")] = Path("runs/run"),
    config: Overrides = None,
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
    import dataclasses
    import json
    from contextlib import ExitStack

    from fedmoe.io.run_folder import RunFolder, run_lock
    from fedmoe.run import load_recipe
    from fedmoe.run.report import combine_reports

    from .report import write_summary

    console = stderr_console(quiet)
    rec, _ = load_recipe(recipe, parse_overrides(config))
    precision_note(rec.train, console)
    if rec.unused_variants:
        console.print(
            f"warning: variants {', '.join(rec.unused_variants)} are not in methods and do not "
            "run; list them in methods to run them",
            style="yellow",
            markup=False,
            soft_wrap=True,
        )
    again = f"fedmoe run {recipe} --out {out}"
    again += "".join(f" -c {c}" for c in config or [])
    with run_lock(out), ExitStack() as stack:  # one fedmoe run per folder at a time
        pools: dict[str, Any] = {}  # one training pool for every seed (same dataset)
        if rec.language_model is None:  # the workers start now, beside the run's setup
            from fedmoe.pipeline.pool import Workers, default_workers

            pools[""] = stack.enter_context(
                Workers(workers or default_workers(), warm=("fedmoe.run.arms",))
            )
        import torch

        torch.set_num_threads(threads or max(1, os.cpu_count() or 1))
        if not rec.seeds:
            path, report = _one_run(
                rec, out, resume, force, workers, quiet, console, pools, stack, again
            )
            emit(path, report, json_)
            return
        reports = []
        for seed in rec.seeds:
            sub = out / f"seed-{seed}"
            one = dataclasses.replace(rec, seed=seed, seeds=())
            started = RunFolder(sub).started()
            if not quiet:
                console.print(f"seed {seed}: {sub}")
            _, report = _one_run(
                one, sub, resume and started, force, workers, quiet, console, pools, stack, again
            )
            reports.append(report)
        summary = combine_reports(reports, [f"seed-{seed}" for seed in rec.seeds])
        summary["recipe"] = json.loads(json.dumps(rec.to_dict()))
        path = out / "summary.json"
        write_summary(summary, path, console, force=True)
        emit(path, summary, json_)


def _one_run(
    rec: Any,
    out: Path,
    resume: bool,
    force: bool,
    workers: int | None,
    quiet: bool,
    console: Any,
    pools: dict[str, Any],
    stack: Any,
    again: str,
) -> tuple[Path, dict[str, Any]]:
    """One seed's run in ``out``: set up (or resume), every arm's rounds, the report."""
    from fedmoe.io.run_folder import RunFolder, completed_rounds, publish_run, remove_round
    from fedmoe.pipeline.pool import TrainPool, default_workers
    from fedmoe.run.orchestrator import check_resume, prepare, write_setup
    from fedmoe.run.provenance import record_run

    resolved = rec.to_dict()
    final = RunFolder(out)
    # --force over an existing run builds the new run beside it and swaps only once it is complete
    staged = force and (final.started() or (resume and final.staging.is_dir()))
    folder = RunFolder(final.staging) if staged else final
    if resume and not (staged and folder.root.is_dir()):
        check_resume(out, resolved)
    elif resume:
        check_resume(folder.root, resolved)
    elif final.started() and not force:
        raise OutputError(
            f"{out} already holds a run; pass --resume to continue it or --force to start over",
        )
    if not resume:
        if staged:
            remove_round(folder.root)  # what an earlier --force left there
        write_setup(rec, folder, resolved)
    record_run(folder.root, sys.argv, resumed=resume)  # run.json: the command and environment
    ctx = prepare(rec, folder.root)
    if not resume:  # a new split: say once if it leaves clients with too few samples
        from fedmoe.partition.small import MIN_TEST, MIN_TRAIN

        from .partition import warn_small_clients

        has_test = rec.partition.local_test > 0
        warn_small_clients(console, ctx.partition.clients, MIN_TRAIN, MIN_TEST if has_test else 0)
    done = completed_rounds(folder.metrics) if resume else {}
    progress = Progress(
        TextColumn("{task.description:>14}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[acc]}"),
        TimeElapsedColumn(),
        console=console,
        disable=quiet or not console.is_terminal,
    )
    part = ctx.partition
    pool = pools.get(part.fingerprint)
    if ctx.language is not None:
        pool = None  # a language model trains in this process, on every thread
    elif pool is None:
        processes = pools.get("", workers or default_workers())  # the run's workers, started
        pool = TrainPool(part.dataset_spec, part.fingerprint, lambda: part.dataset, processes)
        stack.enter_context(pool)
        pools[part.fingerprint] = pool
        if pool.fallback:
            console.print(f"[yellow]note: {pool.fallback}[/yellow]")
    try:
        with _CTRL_C:
            _run_methods(ctx, pool, progress, console, done, quiet)
            _CTRL_C.check()  # never publish a run that was interrupted
    except KeyboardInterrupt:
        kept = (
            f"{out} still holds the previous run; the new run's completed rounds are kept in "
            f"{folder.root}"
            if staged
            else f"the rounds completed so far are kept in {out}"
        )
        hint = again + (" --force" if staged else "") + " --resume"
        raise Interrupted(f"interrupted; {kept}", hint=f"continue with: {hint}") from None
    if staged:
        publish_run(folder.root, out)
    draw = pool.submit if pool is not None and pool.parallel else None  # the plots side by side
    return make_report(out, console, submit=draw)


class _RememberedInterrupt:
    """Ctrl-C that is never lost. Python raises KeyboardInterrupt wherever the main thread is, and
    drops it (printing "Exception ignored") when that is inside a finaliser, such as a file or
    tensor being released; a run would then go on and publish. While active, this handler also
    remembers the signal, and :meth:`check` raises it again at the next round boundary. A
    SIGINT that the parent process chose to ignore stays ignored."""

    def __init__(self) -> None:
        self.seen = False
        self._previous: Any = None

    def __enter__(self) -> _RememberedInterrupt:
        import signal

        self.seen = False
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.seen = True
        raise KeyboardInterrupt

    def check(self) -> None:
        if self.seen:
            raise KeyboardInterrupt

    def __exit__(self, *exc: object) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


_CTRL_C = _RememberedInterrupt()


def _run_methods(
    ctx: Any,
    pool: TrainPool | None,
    progress: Progress,
    console: Any,
    done: dict[str, int],
    quiet: bool,
) -> None:
    """Every method's remaining rounds, with a live progress bar on a terminal."""
    from fedmoe.run.arms import run_arms

    rec, q = ctx.recipe, ctx.quality
    tasks: dict[str, Any] = {}

    def update(method: str, rnd: int, total: int, row: dict[str, Any]) -> None:
        _CTRL_C.check()  # a Ctrl-C Python swallowed (in a finaliser) stops the run here
        v = row.get(q.mean_local)
        score = "" if v is None else f"local {q.short} {q.cell(v)}{'%' if q.unit == '%' else ''}"
        progress.update(tasks[method], completed=rnd, acc=score)
        if rnd == total and progress.disable and not quiet:  # no live bar: one line an arm
            console.print(f"{method}: {total} rounds done")

    with progress:
        for method in rec.arms:
            tasks[method] = progress.add_task(
                method, total=rec.rounds, acc="", completed=done.get(method, 0)
            )
        run_arms(ctx, done, pool, update)


command = handle_errors(run)
