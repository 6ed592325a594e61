"""Quantity skew: IID content, client sizes drawn from a Dirichlet or a log-normal.

Li et al., "Federated Learning on Non-IID Data Silos: An Experimental Study", ICDE 2022
(quantity skew, Dir(β) sizes). Sizes are ``min_size + multinomial(n − N·min_size, w)``, so every
client gets at least ``min_size`` samples without redrawing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fedmoe.errors import UsageError
from fedmoe.partition.base import Partitioner, require_positive

SIZE_DISTRIBUTIONS = ("dirichlet", "lognormal")


@dataclass(frozen=True)
class QuantityPartitioner(Partitioner):
    """Shuffled IID content with skewed client sizes."""

    name: ClassVar[str] = "quantity"
    summary: ClassVar[str] = (
        "quantity skew: IID content, sizes from Dir(alpha) or log-normal(sigma)"
    )

    size_dist: str = "dirichlet"  # "dirichlet" (weights ~ Dir(α)) or "lognormal" (exp N(0, σ²))
    alpha: float = 1.0  # Dirichlet concentration of the size weights
    sigma: float = 1.0  # log-normal spread of the size weights
    min_size: int = 2  # guaranteed samples per client

    def __post_init__(self) -> None:
        if self.size_dist not in SIZE_DISTRIBUTIONS:
            raise UsageError(
                f"--size-dist must be one of {', '.join(SIZE_DISTRIBUTIONS)}, "
                f"got '{self.size_dist}'"
            )
        require_positive(self.alpha, "--alpha", "1.0")
        require_positive(self.sigma, "--sigma", "1.0")

    @classmethod
    def ignored_options(cls, options: dict[str, object]) -> list[str]:
        unused = "sigma" if options.get("size_dist", "dirichlet") == "dirichlet" else "alpha"
        return [unused] if unused in options else []

    def assign(
        self, labels: np.ndarray, domains: np.ndarray, num_clients: int, rng: np.random.Generator
    ) -> np.ndarray:
        n = labels.shape[0]
        if self.size_dist == "dirichlet":
            weights = rng.dirichlet(np.full(num_clients, self.alpha))
        else:
            raw = np.exp(rng.normal(0.0, self.sigma, size=num_clients))
            weights = raw / raw.sum()
        sizes = self.min_size + rng.multinomial(n - self.min_size * num_clients, weights)
        owner = np.empty(n, dtype=np.int64)
        owner[rng.permutation(n)] = np.repeat(np.arange(num_clients, dtype=np.int64), sizes)
        return owner
