"""End to end: ``fedmoe run`` of the quickstart recipe (in quick mode: 2 rounds, 2 methods), with
the same worker pool the command uses (one training process per core), report and plots aside."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from bench.common import Row
from fedmoe.io.run_folder import RunFolder
from fedmoe.pipeline.pool import TrainPool, default_workers
from fedmoe.run import load_recipe
from fedmoe.run.orchestrator import prepare, run_method, write_setup

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml"


def run(quick: bool) -> list[Row]:
    overrides = {"rounds": "2", "methods": "[fedmoe-da, local]"} if quick else {}
    recipe, _ = load_recipe(RECIPE, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        write_setup(recipe, RunFolder(Path(tmp)), recipe.to_dict())
        ctx = prepare(recipe, Path(tmp))
        part = ctx.partition
        pool = TrainPool(
            part.dataset_spec, part.fingerprint, lambda: part.dataset, default_workers()
        )
        with pool:
            for method in recipe.arms:
                run_method(ctx, method, 0, pool)
        seconds = time.perf_counter() - start
    target = "" if quick else "≤ 60 s"
    what = (
        "quick (2 rounds, 2 methods)"
        if quick
        else f"{recipe.rounds} rounds, {len(recipe.methods)} methods"
    )
    return [
        Row(
            f"fedmoe run quickstart, {what}",
            seconds,
            60.0,
            "s",
            60.0 / seconds,
            target,
            (seconds <= 60.0) if target else None,
            "reference: the 60 s budget",
        )
    ]
