"""Label skew: each class is spread over clients by a Dir_N(α) draw.

Hsu, Qi & Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
Classification", arXiv 1909.06335 (2019). Departure: the minimum client size is guaranteed by a
uniform reserve drawn first (see :func:`fedmoe.partition.allocate.reserve`) instead of redrawing
until every client is large enough, which can loop for a long time at small α.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fedmoe.partition.allocate import allocate_by_key, dirichlet_shares, reserve
from fedmoe.partition.base import Partitioner, require_positive


@dataclass(frozen=True)
class DirichletPartitioner(Partitioner):
    """Per-class client shares ~ Dir_N(α); every client gets at least ``min_size`` samples."""

    name: ClassVar[str] = "dirichlet"
    summary: ClassVar[str] = "label skew: each class spread over clients by Dir(alpha)"

    alpha: float = 0.5  # concentration: small → each class on few clients
    min_size: int = 2  # guaranteed samples per client (drawn uniformly first)

    def __post_init__(self) -> None:
        require_positive(self.alpha, "--alpha", "0.5")

    def assign(
        self, labels: np.ndarray, domains: np.ndarray, num_clients: int, rng: np.random.Generator
    ) -> np.ndarray:
        num_keys = int(labels.max()) + 1 if labels.size else 1
        owner = reserve(labels.shape[0], num_clients, self.min_size, rng)
        shares = dirichlet_shares(num_keys, num_clients, self.alpha, rng)  # (C, N)
        return allocate_by_key(labels, shares, owner, rng)
