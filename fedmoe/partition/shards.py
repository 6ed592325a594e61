"""Pathological label skew of the FedAvg paper (McMahan et al., "Communication-Efficient Learning of
Deep Networks from Decentralized Data", AISTATS 2017): sort by label, cut into N·S shards, give each
client S shards. Alternatively ``classes_per_client`` K: each client holds exactly K classes, each
class split evenly among its holders."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fedmoe.errors import UsageError
from fedmoe.partition.allocate import allocate_even, keys_per_client_shares, small_uint
from fedmoe.partition.base import Partitioner, PoolInfo, require_positive


@dataclass(frozen=True)
class ShardsPartitioner(Partitioner):
    """S label-sorted shards per client, or K classes per client."""

    name: ClassVar[str] = "shards"
    summary: ClassVar[str] = "FedAvg's pathological split: S label-sorted shards or K classes each"

    shards_per_client: int = 2  # S: shards per client (FedAvg used 2)
    classes_per_client: int | None = None  # if set: exactly K classes per client instead of shards

    def __post_init__(self) -> None:
        require_positive(self.shards_per_client, "--shards-per-client", "2")
        if self.classes_per_client is not None:
            require_positive(self.classes_per_client, "--classes-per-client", "2")

    @classmethod
    def ignored_options(cls, options: dict[str, object]) -> list[str]:
        if options.get("classes_per_client") is None:
            return []
        return [k for k in ("shards_per_client",) if k in options]

    def check(self, pool: PoolInfo, num_clients: int) -> None:
        k = self.classes_per_client
        if k is not None and k > pool.num_classes:
            raise UsageError(
                f"--classes-per-client {k} exceeds the {pool.num_classes} classes of the data",
                hint=f"use a value from 1 to {pool.num_classes}",
            )
        if k is None and num_clients * self.shards_per_client > pool.num_samples:
            raise UsageError(
                f"{num_clients} clients × {self.shards_per_client} shards exceeds the "
                f"{pool.num_samples} samples of the pool",
                hint="use fewer clients or fewer --shards-per-client",
            )
        if num_clients > pool.num_samples:
            raise UsageError(
                f"{num_clients} clients but only {pool.num_samples} samples in the pool",
                hint=f"use at most {pool.num_samples} clients",
            )

    def assign(
        self, labels: np.ndarray, domains: np.ndarray, num_clients: int, rng: np.random.Generator
    ) -> np.ndarray:
        num_classes = int(labels.max()) + 1 if labels.size else 1
        if self.classes_per_client is not None:
            shares = keys_per_client_shares(num_classes, num_clients, self.classes_per_client, rng)
            return allocate_even(labels, shares, rng)
        n = labels.shape[0]
        num_shards = num_clients * self.shards_per_client
        perm = rng.permutation(n)
        by_label = perm[np.argsort(small_uint(labels[perm], num_classes), kind="stable")]
        shard = np.arange(n, dtype=np.int64) * num_shards // n  # (n,) shard of each sorted slot
        shard_owner = rng.permutation(num_shards) // self.shards_per_client  # (N·S,)
        owner = np.empty(n, dtype=np.int64)
        owner[by_label] = shard_owner[shard]
        return owner
