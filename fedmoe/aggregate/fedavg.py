"""FedAvg over the whole MoE: every parameter averaged, weighted by sample counts (McMahan et al.,
"Communication-Efficient Learning of Deep Networks from Decentralized Data", AISTATS 2017)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fedmoe.aggregate.base import Aggregator, ClientInfo, MergeSpec, fedavg_within_groups


@dataclass(frozen=True)
class FedAvg(Aggregator):
    """Everything averaged with sample weights."""

    name: ClassVar[str] = "fedavg"
    summary: ClassVar[str] = "average every parameter, weighted by sample counts"

    def spec(self, infos: list[ClientInfo], num_experts: int, gate_shared: bool) -> MergeSpec:
        return fedavg_within_groups(infos, num_experts, lambda _: 0, self.name)
