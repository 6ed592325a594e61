"""The naive MoE federation: embedding and gate averaged (sample-weighted); expert j averaged only
with expert j of the other clients, weighted by how many samples each client routed to it (its
``topk_count``), falling back to sample counts for a client without routing statistics. Weighting
by routed load rather than by client size is what keeps this distinct from plain FedAvg."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fedmoe.aggregate.base import (
    Aggregator,
    ClientInfo,
    MergeSpec,
    expert_index,
    same_index_matrix,
    sample_weights,
)


@dataclass(frozen=True)
class NaiveMoE(Aggregator):
    """Shared parts averaged; expert j with expert j, weighted by routed samples."""

    name: ClassVar[str] = "naive-moe"
    summary: ClassVar[str] = "average shared parts; expert j with expert j, by routed samples"

    def spec(self, infos: list[ClientInfo], num_experts: int, gate_shared: bool) -> MergeSpec:
        index = expert_index(infos, num_experts)
        fed = sample_weights(infos)
        load = np.zeros((len(infos), num_experts))
        for pos, info in enumerate(infos):
            counts = (info.routing or {}).get("topk_count")
            if counts is not None and len(counts) == num_experts:
                load[pos] = counts
            else:
                load[pos] = info.num_samples
        per: dict[int, dict[int, list[tuple[int, float]]]] = {i.client: {} for i in infos}
        for j in range(num_experts):
            col = load[:, j]
            w = col / col.sum() if col.sum() > 0 else np.full(len(infos), 1.0 / len(infos))
            pairs = [(info.client, float(x)) for info, x in zip(infos, w, strict=True)]
            for info in infos:
                per[info.client][j] = pairs
        return MergeSpec(
            index, {i.client: fed for i in infos}, True, same_index_matrix(index, per), self.name
        )
