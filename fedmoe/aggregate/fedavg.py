"""FedAvg over the whole MoE: every parameter averaged, weighted by sample counts (McMahan et al.,
"Communication-Efficient Learning of Deep Networks from Decentralized Data", AISTATS 2017)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fedmoe.aggregate.base import (
    Aggregator,
    ClientInfo,
    MergeSpec,
    expert_index,
    same_index_matrix,
    sample_weights,
)


@dataclass(frozen=True)
class FedAvg(Aggregator):
    """Everything averaged with sample weights."""

    name: ClassVar[str] = "fedavg"
    summary: ClassVar[str] = "average every parameter, weighted by sample counts"

    def spec(self, infos: list[ClientInfo], num_experts: int, gate_shared: bool) -> MergeSpec:
        index = expert_index(infos, num_experts)
        fed = sample_weights(infos)
        per = {i.client: {j: list(fed) for j in range(num_experts)} for i in infos}
        return MergeSpec(
            index, {i.client: fed for i in infos}, True, same_index_matrix(index, per), self.name
        )
