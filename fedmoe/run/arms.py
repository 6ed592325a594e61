"""Running a run's arms (its methods and variants): one after the other, or side by side in the
training pool's worker processes.

An arm is a whole federation on its own: its rounds read the run's shared setup (partition,
initial model) and write only under ``rounds/<arm>/`` and the lines it appends to
``metrics.jsonl``. So a run with two or more arms to go and a pool of worker processes gives each
worker a whole arm: the worker trains the arm's clients (one cohort a round,
:mod:`fedmoe.train.cohort`) and does its merges, affinities, plans and evaluations too, while the
other worker runs another arm. Before, the clients of one round were split between the workers
and everything else waited on the parent process, with both cores busy only while clients
trained; the quickstart (5 arms, 2 workers) went from 134 s to 64 s with the cohorts.

The results do not depend on the schedule: every arm's files are byte for byte those of the arm
run alone (each client's training is seeded by (seed, round, client) and runs on one torch
thread either way; NumPy keeps its own thread count, as in the commands run by hand, whose
similarities it rounds by; ``tests/test_run.py`` and ``tests/test_cli_vs_run.py`` check it).
Only the order of the arms' lines in
``metrics.jsonl`` does (each line names its method and round, and every reader groups by them).
With one arm to go, or no worker processes, or a language model (which trains in the parent on
every thread), the arms run one after the other and each round's clients are split between the
workers instead.
"""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, Future, wait
from pathlib import Path
from typing import Any

from fedmoe.io.run_folder import read_lines, repair_lines
from fedmoe.pipeline.pool import TrainPool, worker_dataset
from fedmoe.run.orchestrator import Progress, RunContext, prepare, run_method
from fedmoe.run.recipe import Recipe

POLL_S = 0.25  # how often the parent reads the arms' new metrics lines (progress, Ctrl-C)


def run_arms(
    ctx: RunContext,
    start: dict[str, int],
    pool: TrainPool | None,
    progress: Progress | None = None,
) -> None:
    """Every arm's rounds after ``start[arm]`` (rounds already done), in the recipe's arm order.

    Parameters
    ----------
    ctx
        The run.
    start
        Arm → its last completed round (absent: none).
    pool
        The training pool (None for a language model).
    progress
        Called with (arm, round, rounds, metrics row) after each arm's round, in this process.
    """
    rounds = ctx.recipe.rounds
    todo = [(arm, start.get(arm, 0)) for arm in ctx.recipe.arms if start.get(arm, 0) < rounds]
    if pool is None or not pool.parallel or ctx.language is not None or len(todo) < 2:
        for arm, done in todo:
            run_method(ctx, arm, done, pool, progress)
        return
    repair_lines(ctx.folder.metrics)  # before the workers append to it side by side
    futures: list[Future[None]] = [
        pool.submit(_run_arm, ctx.recipe, ctx.folder.root, arm, done) for arm, done in todo
    ]
    seen = dict(todo)
    try:
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, timeout=POLL_S, return_when=FIRST_COMPLETED)
            _new_rounds(ctx.folder.metrics, seen, rounds, progress)
            for future in finished:
                future.result()  # an arm's error, raised here as it was raised there
        _new_rounds(ctx.folder.metrics, seen, rounds, progress)
    except BaseException:
        pool.abort()  # the other arms stop too; their completed rounds stay for --resume
        raise


def _run_arm(recipe: Recipe, root: Path, arm: str, done: int) -> None:
    """In a worker process: one arm's remaining rounds, its clients trained in this process."""
    dataset = worker_dataset()
    ctx = prepare(recipe, root, dataset)
    part = ctx.partition
    inline = TrainPool(part.dataset_spec, part.fingerprint, lambda: part.dataset, workers=1)
    with inline:
        run_method(ctx, arm, done, inline, None, shared_log=True)


def _new_rounds(
    metrics: Path, seen: dict[str, int], rounds: int, progress: Progress | None
) -> None:
    """Report, in round order, the arms' rounds that reached ``metrics`` since the last call."""
    if progress is None:
        return
    new: dict[tuple[str, int], dict[str, Any]] = {}
    for row in read_lines(metrics):
        arm, rnd = row.get("method"), row.get("round")
        if isinstance(arm, str) and isinstance(rnd, int) and arm in seen and rnd > seen[arm]:
            new[(arm, rnd)] = row
    for (arm, rnd), row in sorted(new.items(), key=lambda item: (item[0][1], item[0][0])):
        if rnd > seen[arm]:
            seen[arm] = rnd
            progress(arm, rnd, rounds, row)
