"""End to end: ``fedmoe run`` of the quickstart recipe (in quick mode: 2 rounds, 2 methods) as a
user runs it — the command in its own process, with its worker pool (one process per core, each
running whole arms, each training a round's clients as one cohort), report and plots included —
against what its clients' training costs alone: the quickstart's 20 clients' first local round
timed here one client at a time on one thread (how every client trained before cohorts), scaled
to every client job of the run and divided by the workers. A second row times the same 20 local
rounds as one cohort (the same tensors, bit for bit) against one at a time."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import Row
from fedmoe.pipeline.pool import Job, _train, default_workers
from fedmoe.run import load_recipe
from fedmoe.run.orchestrator import prepare

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml"


def _first_round(out: Path, overrides: dict[str, str]) -> tuple[float, float, int, int]:
    """(seconds one client at a time, seconds as one cohort, clients, client jobs in the run)
    for round 1 of the run in ``out``, on one thread."""
    recipe, _ = load_recipe(RECIPE, overrides)
    ctx = prepare(recipe, out)
    part = ctx.partition
    init = ctx.open_init()
    start = init.state()
    cfg = recipe.method(recipe.methods[0]).local_training(recipe.train)
    jobs = [
        Job(init.moe_config, start, part.client(c), cfg, recipe.seed, 1, c)
        for c in range(part.num_clients)
    ]
    dataset = part.dataset
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train(jobs[:2], dataset)  # warm-up
        begin = time.perf_counter()
        for job in jobs:
            _train([job], dataset)
        alone = time.perf_counter() - begin
        begin = time.perf_counter()
        _train(jobs, dataset)
        cohort = time.perf_counter() - begin
    finally:
        torch.set_num_threads(previous)
    return alone, cohort, len(jobs), recipe.rounds * len(recipe.arms) * len(jobs)


def run(quick: bool) -> list[Row]:
    overrides = {"rounds": "2", "methods": "[fedmoe-da, local]"} if quick else {}
    recipe, _ = load_recipe(RECIPE, overrides)
    workers = default_workers()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "fedmoe_cli.app", "run", str(RECIPE), "--out", str(out), "-q"]
        cmd += [a for k, v in overrides.items() for a in ("-c", f"{k}={v}")]
        begin = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - begin
        alone, cohort, clients, total = _first_round(out, overrides)
    ideal = alone / clients * total / workers
    target = "" if quick else "≤ 40 s"
    what = (
        "quick (2 rounds, 2 methods)"
        if quick
        else f"{recipe.rounds} rounds, {len(recipe.arms)} methods"
    )
    return [
        Row(
            f"fedmoe run quickstart, {what}, the command: wall time against its clients' "
            "training alone (one at a time)",
            seconds,
            ideal,
            "s",
            ideal / seconds,
            target,
            (seconds <= 40.0) if target else None,
            f"reference: {total} client jobs × {1e3 * alone / clients:.0f} ms (round 1's "
            f"{clients} clients timed one at a time, 1 thread) / {workers} workers",
        ),
        Row(
            f"local round of the quickstart's {clients} clients as one cohort (same tensors, "
            "bit for bit) against one client at a time, 1 thread",
            cohort,
            alone,
            "s",
            alone / cohort,
            "",
            None,
            "",
        ),
    ]
