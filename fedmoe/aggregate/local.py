"""Local training only: no communication, every client keeps its model (the lower reference)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fedmoe.aggregate.base import Aggregator, ClientInfo, MergeSpec, expert_index
from fedmoe.plan.matrix import identity_matrix


@dataclass(frozen=True)
class Local(Aggregator):
    """Nothing moves."""

    name: ClassVar[str] = "local"
    summary: ClassVar[str] = "no communication: every client keeps its own model"

    def spec(self, infos: list[ClientInfo], num_experts: int, gate_shared: bool) -> MergeSpec:
        index = expert_index(infos, num_experts)
        return MergeSpec(
            index,
            {i.client: ((i.client, 1.0),) for i in infos},
            False,
            identity_matrix(index),
            self.name,
        )
