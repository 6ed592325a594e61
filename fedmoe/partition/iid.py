"""IID: a uniformly shuffled split into (nearly) equal clients.

Unlike flwr-datasets' ``IidPartitioner``, which cuts the dataset in its stored order, the pool is
shuffled first, so sorted or grouped source files still give IID clients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fedmoe.partition.base import Partitioner


@dataclass(frozen=True)
class IidPartitioner(Partitioner):
    """Shuffle, then cut into N parts whose sizes differ by at most one."""

    name: ClassVar[str] = "iid"
    summary: ClassVar[str] = "shuffled, equal-size clients (no skew)"

    def assign(
        self, labels: np.ndarray, domains: np.ndarray, num_clients: int, rng: np.random.Generator
    ) -> np.ndarray:
        n = labels.shape[0]
        sizes = np.full(num_clients, n // num_clients) + (np.arange(num_clients) < n % num_clients)
        owner = np.empty(n, dtype=np.int64)
        owner[rng.permutation(n)] = np.repeat(np.arange(num_clients, dtype=np.int64), sizes)
        return owner
