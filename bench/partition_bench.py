"""Partitioning a million labels (10 classes, 4 domains) into 1,000 clients: the scheme's assignment
and the whole pipeline, against a NumPy stable sort of the same labels (the floor of any split that
groups by label) and, where installed, flwr-datasets' DirichletPartitioner on an in-memory dataset.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bench.common import Row, median_time, skipped
from fedmoe.partition import Partitioner, get_partitioner, make_partition


def run(quick: bool) -> list[Row]:
    n = 100_000 if quick else 1_000_000
    clients = 100 if quick else 1000
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, n)
    domains = rng.integers(0, 4, n)
    sort_s = median_time(lambda: np.argsort(labels.astype(np.uint16), kind="stable"))
    rows = []
    schemes: tuple[tuple[str, dict[str, object]], ...] = (
        ("dirichlet", {"alpha": 0.5}),
        ("domain-label", {}),
    )
    for scheme, opts in schemes:
        part = get_partitioner(scheme, opts)

        def assign(part: Partitioner = part) -> object:
            return part.assign(labels, domains, clients, np.random.default_rng(0))

        def pipeline(part: Partitioner = part) -> object:
            return make_partition(labels, domains, clients, part, 0, 0.0, 0.2)

        assign_s = median_time(assign)
        pipe_s = median_time(pipeline)
        target = "≤ 50 ms" if scheme == "dirichlet" and not quick else ""
        rows.append(
            Row(
                f"partition {scheme}: assign {n:,} labels → {clients} clients",
                assign_s,
                sort_s,
                "s",
                sort_s / assign_s,
                target,
                (assign_s <= 0.05) if target else None,
                "reference: np.argsort(uint16 labels, stable)",
                {"samples_per_s": n / assign_s},
            )
        )
        rows.append(
            Row(
                f"partition {scheme}: whole pipeline (+ local split, counts, metrics)",
                pipe_s,
                sort_s,
                "s",
                sort_s / pipe_s,
                "",
                None,
                "reference: np.argsort(uint16 labels, stable)",
                {"samples_per_s": n / pipe_s},
            )
        )
    rows.extend(_flwr(labels, clients, quick))
    return rows


def flwr_stages(n: int, clients: int, quick: bool) -> dict[str, float] | None:
    """flwr-datasets' stage times on the bench's labels (run in a fresh interpreter: importing
    ``datasets`` leaves thread pools that slow the 2-thread torch rows of later suites)."""
    try:
        from datasets import Dataset
        from flwr_datasets.partitioner import DirichletPartitioner
    except ImportError:
        return None
    labels = np.random.default_rng(0).integers(0, 10, n)  # the same labels as run()
    ds = Dataset.from_dict({"label": labels.astype(np.int64)})

    class Read:
        """What the partitioner reads of its dataset, already out of Arrow (stage 2 alone)."""

        num_rows = n
        column = labels.astype(np.int64)
        classes = sorted(ds.unique("label"))

        def unique(self, _: str) -> list[int]:
            return list(self.classes)

        def __getitem__(self, _: str) -> np.ndarray:
            return self.column

    def indices(data: Any) -> None:
        p = DirichletPartitioner(
            num_partitions=clients,
            partition_by="label",
            alpha=0.5,
            min_partition_size=0,
            self_balancing=False,
            seed=0,
        )
        p._dataset = data  # the setter insists on a Dataset; Read answers the same reads
        p._determine_partition_id_to_indices_if_needed()

    repeats = 2 if quick else 3
    read_s = median_time(lambda: (ds.unique("label"), np.array(ds["label"])), repeats=repeats)
    split_s = median_time(lambda: indices(Read()), repeats=repeats)
    done = DirichletPartitioner(
        num_partitions=clients, partition_by="label", alpha=0.5, min_partition_size=0,
        self_balancing=False, seed=0,
    )  # fmt: skip
    done.dataset = ds
    done.load_partition(0)
    select_s = median_time(
        lambda: [done.load_partition(i) for i in range(clients)], repeats=repeats
    )
    return {"read": read_s, "split": split_s, "select": select_s}


def _flwr(labels: np.ndarray, clients: int, quick: bool) -> list[Row]:
    """flwr-datasets' DirichletPartitioner timed by stage, each against our whole Dirichlet
    pipeline (assignment, local test split, counts, metrics; NumPy labels in):
    1. the labels read out of the Arrow dataset as its partitioner reads them (``unique``, and the
       column to Python then NumPy); our pipeline never pays it;
    2. the split itself: its partition → indices map given those reads already done;
    3. every partition materialised (``load_partition``: an Arrow ``select``)."""
    import json
    import subprocess
    import sys

    metric = f"peer: flwr-datasets DirichletPartitioner, {labels.size:,} labels"
    code = (
        "import json, sys; from bench.partition_bench import flwr_stages as f; "
        "print(json.dumps(f(*json.loads(sys.argv[1]))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps([int(labels.size), clients, quick])],
        capture_output=True,
        text=True,
        check=False,
    )
    stages = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None
    if stages is None:
        return [skipped(metric, "flwr-datasets")]
    part = get_partitioner("dirichlet", {"alpha": 0.5})
    ours = median_time(
        lambda: make_partition(labels, np.zeros_like(labels), clients, part, 0, 0.0, 0.2)
    )
    read_s, split_s, select_s = stages["read"], stages["split"], stages["select"]
    note = "ours: the whole dirichlet pipeline (NumPy labels in); ratio = peer time / ours"
    return [
        Row(f"{metric}, stage 1: labels out of Arrow (unique, column to NumPy)", ours, read_s, "s",
            read_s / ours, note=note),
        Row(f"{metric}, stage 2: the Dirichlet split alone", ours, split_s, "s",
            split_s / ours, note=note),
        Row(f"{metric}, stage 3: all {clients:,} partitions materialised (Arrow select)", ours,
            select_s, "s", select_s / ours, note=note),
        Row(f"{metric}: stages 1-3 together", ours, read_s + split_s + select_s, "s",
            (read_s + split_s + select_s) / ours, note=note),
    ]  # fmt: skip
