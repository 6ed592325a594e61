"""End to end: ``fedmoe run`` of the quickstart recipe (in quick mode: 2 rounds, 2 methods), with
the same worker pool the command uses (one training process per core), report and plots aside,
against what its training alone costs: a sample of the run's own client jobs (every
:data:`SAMPLE`-th, same start model, data and settings) is timed again here, one at a time on one
thread, scaled to every job and divided by the workers. The ratio is the share of the wall time
that is clients' training; the rest is the federation's overhead (merges, affinity, plans,
evaluation, files, process round trips)."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import Row
from fedmoe.io.run_folder import RunFolder
from fedmoe.pipeline.pool import Job, TrainPool, _train, default_workers
from fedmoe.run import load_recipe
from fedmoe.run.orchestrator import prepare, run_method, write_setup

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml"
SAMPLE = 10  # time every 10th job of the run again, alone


class RecordingPool(TrainPool):
    """The command's pool, keeping every :data:`SAMPLE`-th job it trains (and counting all)."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.jobs = 0
        self.sample: list[Job] = []
        self.seconds = 0.0  # wall time spent in run(): training as the run sees it

    def run(self, jobs: list[Job]) -> list:
        for job in jobs:
            if self.jobs % SAMPLE == 0:
                self.sample.append(job)
            self.jobs += 1
        start = time.perf_counter()
        try:
            return super().run(jobs)
        finally:
            self.seconds += time.perf_counter() - start


def training_alone(pool: RecordingPool, dataset: object) -> tuple[float, float]:
    """(seconds per job, one thread, alone; the estimated sum over every job of the run)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = []
        for job in pool.sample:
            start = time.perf_counter()
            _train(job, dataset)  # type: ignore[arg-type]
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    per_job = statistics.mean(times)
    return per_job, per_job * pool.jobs


def run(quick: bool) -> list[Row]:
    overrides = {"rounds": "2", "methods": "[fedmoe-da, local]"} if quick else {}
    recipe, _ = load_recipe(RECIPE, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        write_setup(recipe, RunFolder(Path(tmp)), recipe.to_dict())
        ctx = prepare(recipe, Path(tmp))
        part = ctx.partition
        workers = default_workers()
        pool = RecordingPool(part.dataset_spec, part.fingerprint, lambda: part.dataset, workers)
        with pool:
            for method in recipe.arms:
                run_method(ctx, method, 0, pool)
        seconds = time.perf_counter() - start
        per_job, total = training_alone(pool, part.dataset)
    ideal = total / workers
    target = "" if quick else "≤ 40 s"
    what = (
        "quick (2 rounds, 2 methods)"
        if quick
        else f"{recipe.rounds} rounds, {len(recipe.methods)} methods"
    )
    return [
        Row(
            f"fedmoe run quickstart, {what}: wall time against its clients' training alone",
            seconds,
            ideal,
            "s",
            ideal / seconds,
            target,
            (seconds <= 40.0) if target else None,
            f"reference: {pool.jobs} client jobs × {1e3 * per_job:.0f} ms (mean of "
            f"{len(pool.sample)} of them re-timed alone, 1 thread) / {workers} workers; the "
            f"run waited {pool.seconds:.1f} s on its training pool",
        )
    ]
