"""FedMoE-DA aggregation (Zhan et al., arXiv 2411.02115): sample-weighted FedAvg of the embedding
(and of the gate when shared), and every expert merged by Eq. 11 over the sparse matrix A of
Eq. 9–10 that ``plan-sync`` built."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fedmoe.aggregate.base import Aggregator, ClientInfo, MergeSpec, expert_index, sample_weights
from fedmoe.errors import InputError
from fedmoe.plan.matrix import AggregationMatrix


@dataclass(frozen=True)
class FedMoEDA(Aggregator):
    """Eq. 11 over the plan's matrix; FedAvg of the shared parts."""

    name: ClassVar[str] = "fedmoe-da"
    summary: ClassVar[str] = "domain-aware expert merge by the sync plan (FedMoE-DA Eq. 9-11)"

    matrix: AggregationMatrix  # A from plan-sync

    def spec(self, infos: list[ClientInfo], num_experts: int, gate_shared: bool) -> MergeSpec:
        index = expert_index(infos, num_experts)
        if index != self.matrix.index:
            have = set(self.matrix.index.clients)
            missing = sorted(set(index.clients) ^ have)
            raise InputError(
                f"the sync plan covers clients {sorted(have)}, the checkpoints "
                f"{list(index.clients)} (differ in {missing})",
                hint="plan and aggregate the same set of client checkpoints",
            )
        fed = sample_weights(infos)
        return MergeSpec(index, {i.client: fed for i in infos}, gate_shared, self.matrix, self.name)
