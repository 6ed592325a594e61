"""Domain skew and label skew together.

Every (domain d, label c) cell is spread over clients with shares proportional to
``p_dom[d, i] · p_lab[c, i]``, where ``p_dom[d] ~ Dir_N(α_domain)`` (or an even split over the K
clients holding domain d) and ``p_lab[c] ~ Dir_N(α)``. As α → ∞ this reduces to pure domain skew; as
α_domain → ∞, to the label skew of Hsu et al. 2019. This is the setting FedMoE-DA (arXiv 2411.02115)
targets: clients differ both in which domains and which classes they see. No peer library offers it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fedmoe.partition.allocate import (
    allocate_by_key,
    dirichlet_shares,
    keys_per_client_shares,
    reserve,
)
from fedmoe.partition.base import Partitioner, PoolInfo, require_positive
from fedmoe.partition.domain import check_domains


@dataclass(frozen=True)
class DomainLabelPartitioner(Partitioner):
    """Cell shares ∝ domain share × label share, both per client."""

    name: ClassVar[str] = "domain-label"
    summary: ClassVar[str] = "domain and label skew together (cell shares = domain × label)"

    alpha: float = 0.5  # label concentration
    alpha_domain: float = 0.5  # domain concentration
    domains_per_client: int | None = None  # if set: K domains per client instead of Dir(α_domain)
    min_size: int = 2  # guaranteed samples per client (drawn uniformly first)

    def __post_init__(self) -> None:
        require_positive(self.alpha, "--alpha", "0.5")
        require_positive(self.alpha_domain, "--alpha-domain", "0.5")
        if self.domains_per_client is not None:
            require_positive(self.domains_per_client, "--domains-per-client", "1")

    @classmethod
    def ignored_options(cls, options: dict[str, object]) -> list[str]:
        if options.get("domains_per_client") is None:
            return []
        return [k for k in ("alpha_domain",) if k in options]

    def check(self, pool: PoolInfo, num_clients: int) -> None:
        check_domains(pool, self.name, self.domains_per_client)
        super().check(pool, num_clients)

    def assign(
        self, labels: np.ndarray, domains: np.ndarray, num_clients: int, rng: np.random.Generator
    ) -> np.ndarray:
        num_classes = int(labels.max()) + 1 if labels.size else 1
        num_domains = int(domains.max()) + 1 if domains.size else 1
        if self.domains_per_client is not None:
            p_dom = keys_per_client_shares(num_domains, num_clients, self.domains_per_client, rng)
        else:
            p_dom = dirichlet_shares(num_domains, num_clients, self.alpha_domain, rng)  # (D, N)
        p_lab = dirichlet_shares(num_classes, num_clients, self.alpha, rng)  # (C, N)
        cell = p_dom[:, None, :] * p_lab[None, :, :]  # (D, C, N)
        cell = cell.reshape(num_domains * num_classes, num_clients)  # (D·C, N)
        totals = cell.sum(axis=1, keepdims=True)
        # a cell whose domain holders and label holders do not overlap falls back to its domain
        fallback = np.repeat(p_dom, num_classes, axis=0)  # (D·C, N)
        shares = np.where(totals > 1e-12, cell / np.maximum(totals, 1e-300), fallback)
        keys = domains * num_classes + labels  # (n,) cell id
        owner = reserve(labels.shape[0], num_clients, self.min_size, rng)
        return allocate_by_key(keys, shares, owner, rng)
