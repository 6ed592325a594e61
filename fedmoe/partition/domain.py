"""Domain skew: each client's data comes from few domains.

Either each domain is spread over clients by Dir_N(α_domain) (the label-skew construction of Hsu
et al. 2019 applied to domain ids, as in the domain-skew setting of FedMoE-DA, arXiv 2411.02115),
or each client holds exactly ``domains_per_client`` domains, split evenly among their holders.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fedmoe.errors import UsageError
from fedmoe.partition.allocate import (
    allocate_by_key,
    allocate_even,
    dirichlet_shares,
    keys_per_client_shares,
    reserve,
)
from fedmoe.partition.base import Partitioner, PoolInfo, require_positive


def check_domains(pool: PoolInfo, scheme: str, per_client: int | None) -> None:
    """Refuse domain schemes on data without domains, or K larger than the number of domains."""
    if not pool.has_domains or pool.num_domains < 2:
        raise UsageError(
            f"scheme '{scheme}' needs data with at least 2 domains; this dataset has "
            f"{pool.num_domains if pool.has_domains else 'no domain information'}",
            hint="use --scheme dirichlet, or give a domain column (--domain-column / 'domain' "
            "array)",
        )
    if per_client is not None and per_client > pool.num_domains:
        raise UsageError(
            f"--domains-per-client {per_client} exceeds the {pool.num_domains} domains of the data",
            hint=f"use a value from 1 to {pool.num_domains}",
        )


@dataclass(frozen=True)
class DomainPartitioner(Partitioner):
    """Per-domain client shares ~ Dir_N(α_domain), or K domains per client."""

    name: ClassVar[str] = "domain"
    summary: ClassVar[str] = "domain skew: Dir(alpha) over domains, or K domains per client"

    alpha: float = 0.5  # concentration over domains: small → each client sees few domains
    domains_per_client: int | None = None  # if set: exactly K domains per client, even split
    min_size: int = 2  # guaranteed samples per client (Dirichlet mode; drawn uniformly first)

    def __post_init__(self) -> None:
        require_positive(self.alpha, "--alpha", "0.5")
        if self.domains_per_client is not None:
            require_positive(self.domains_per_client, "--domains-per-client", "1")

    @classmethod
    def ignored_options(cls, options: dict[str, object]) -> list[str]:
        if options.get("domains_per_client") is None:
            return []
        return [k for k in ("alpha", "min_size") if k in options]

    def check(self, pool: PoolInfo, num_clients: int) -> None:
        check_domains(pool, self.name, self.domains_per_client)
        super().check(pool, num_clients)

    def assign(
        self, labels: np.ndarray, domains: np.ndarray, num_clients: int, rng: np.random.Generator
    ) -> np.ndarray:
        num_keys = int(domains.max()) + 1 if domains.size else 1
        if self.domains_per_client is not None:
            shares = keys_per_client_shares(num_keys, num_clients, self.domains_per_client, rng)
            return allocate_even(domains, shares, rng)
        owner = reserve(domains.shape[0], num_clients, self.min_size, rng)
        shares = dirichlet_shares(num_keys, num_clients, self.alpha, rng)  # (D, N)
        return allocate_by_key(domains, shares, owner, rng)
