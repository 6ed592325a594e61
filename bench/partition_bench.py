"""Partitioning a million labels (10 classes, 4 domains) into 1,000 clients: the scheme's assignment
and the whole pipeline, against a NumPy stable sort of the same labels (the floor of any split that
groups by label) and, where installed, flwr-datasets' DirichletPartitioner on an in-memory dataset.
"""

from __future__ import annotations

import numpy as np

from bench.common import Row, median_time, skipped
from fedmoe.partition import get_partitioner, make_partition


def run(quick: bool) -> list[Row]:
    n = 100_000 if quick else 1_000_000
    clients = 100 if quick else 1000
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, n)
    domains = rng.integers(0, 4, n)
    sort_s = median_time(lambda: np.argsort(labels.astype(np.uint16), kind="stable"))
    rows = []
    for scheme, opts in (("dirichlet", {"alpha": 0.5}), ("domain-label", {})):
        part = get_partitioner(scheme, opts)
        assign_s = median_time(
            lambda part=part: part.assign(labels, domains, clients, np.random.default_rng(0))
        )
        pipe_s = median_time(
            lambda part=part: make_partition(labels, domains, clients, part, 0, 0.0, 0.2)
        )
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
    rows.append(_flwr(labels, clients, quick))
    return rows


def _flwr(labels: np.ndarray, clients: int, quick: bool) -> Row:
    metric = f"peer: flwr-datasets DirichletPartitioner, {labels.size:,} labels"
    try:
        from datasets import Dataset
        from flwr_datasets.partitioner import DirichletPartitioner
    except ImportError:
        return skipped(metric, "flwr-datasets")
    ds = Dataset.from_dict({"label": labels.astype(np.int64)})

    def split() -> None:
        p = DirichletPartitioner(
            num_partitions=clients,
            partition_by="label",
            alpha=0.5,
            min_partition_size=0,
            self_balancing=False,
            seed=0,
        )
        p.dataset = ds
        p.load_partition(0)  # triggers the whole split

    peer = median_time(split, repeats=1 if not quick else 2)
    part = get_partitioner("dirichlet", {"alpha": 0.5})
    ours = median_time(
        lambda: make_partition(labels, np.zeros_like(labels), clients, part, 0, 0.0, 0.2)
    )
    return Row(
        metric,
        ours,
        peer,
        "s",
        peer / ours,
        note="ours: whole dirichlet pipeline; ratio = peer time / ours",
    )
