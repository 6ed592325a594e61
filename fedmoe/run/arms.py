"""Running a run's arms (its methods and variants): one after the other, or side by side in the
training pool's worker processes.

An arm is a whole federation on its own: its rounds read the run's shared setup (partition,
initial model) and write only under ``rounds/<arm>/`` and the lines it appends to
``metrics.jsonl``, and a round needs only what earlier rounds left on disk (which is what makes
``--resume`` exact). So a run with two or more arms to go and a pool of worker processes hands
out **rounds of arms** to the workers: each arm's next round is queued as soon as its previous
round is done, the workers take the queue in order, and a worker runs a whole round — the
clients' training (one cohort, :mod:`fedmoe.train.cohort`), the method's affinity and plan, the
merge and the evaluation — while the other worker runs another arm's round. The arms advance
together and end together, so no worker waits while the last arm finishes. Before, the clients
of one round were split between the workers and everything else waited on the parent process:
the quickstart (5 arms, 2 workers) went from 134 s to under a minute with the cohorts.

The results do not depend on the schedule: every arm's files are byte for byte those of the arm
run alone, in one process (each client's training is seeded by (seed, round, client) and runs on
one torch thread either way; NumPy keeps its own thread count, as in the commands run by hand,
whose similarities it rounds by; ``tests/test_run.py`` and ``tests/test_cli_vs_run.py`` check
it). Only the order of the arms' lines in ``metrics.jsonl`` does (each line names its method and
round, and every reader groups by them). With one arm to go, or no worker processes, or a
language model (which trains in the parent on every thread), the arms run one after the other
and each round's clients are split between the workers instead.
"""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, Future, wait
from pathlib import Path
from typing import Any

from fedmoe.io.run_folder import read_lines, repair_lines
from fedmoe.pipeline.pool import TrainPool, worker_dataset
from fedmoe.plots import warm as warm_plots
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
        for arm, completed in todo:
            run_method(ctx, arm, completed, pool, progress)
        return
    repair_lines(ctx.folder.metrics)  # before the workers append to it side by side
    done = dict(todo)
    running: dict[Future[None], str] = {}

    def queue(arm: str) -> None:
        running[pool.submit(_run_round, ctx.recipe, ctx.folder.root, arm, done[arm])] = arm

    def queue_last() -> None:
        # once every arm's last round is queued, a worker with nothing left loads matplotlib for
        # the report's plots (drawn in the workers next) instead of waiting for the other
        if all(n + 1 >= rounds for n in done.values()):
            for _ in range(pool.workers):
                warming.append(pool.submit(warm_plots))

    warming: list[Future[None]] = []
    for arm in done:  # every arm's first round, in the recipe's order
        queue(arm)
    queue_last()
    seen = dict(todo)
    try:
        while running:
            finished, _ = wait(set(running), timeout=POLL_S, return_when=FIRST_COMPLETED)
            _new_rounds(ctx.folder.metrics, seen, rounds, progress)
            for future in finished:
                arm = running.pop(future)
                future.result()  # an arm's error, raised here as it was raised there
                done[arm] += 1
                if done[arm] < rounds:
                    queue(arm)  # its next round, behind the other arms' queued rounds
                    if not warming:
                        queue_last()
        _new_rounds(ctx.folder.metrics, seen, rounds, progress)
    except BaseException:
        pool.abort()  # the other arms stop too; their completed rounds stay for --resume
        raise


_WORKER: dict[str, tuple[Recipe, RunContext, TrainPool]] = {}  # run folder -> its context


def _run_round(recipe: Recipe, root: Path, arm: str, done: int) -> None:
    """In a worker process: round ``done + 1`` of one arm, its clients trained in this process
    (the run's context is made once per worker and run folder)."""
    key = str(root)
    cached = _WORKER.get(key)
    if cached is None or cached[0] != recipe:
        ctx = prepare(recipe, root, worker_dataset())
        part = ctx.partition
        inline = TrainPool(part.dataset_spec, part.fingerprint, lambda: part.dataset, workers=1)
        cached = _WORKER[key] = (recipe, ctx, inline)
    _, ctx, inline = cached
    run_method(ctx, arm, done, inline, None, shared_log=True, last=done + 1)


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
