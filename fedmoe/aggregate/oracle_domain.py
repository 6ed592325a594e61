"""The oracle reference: FedAvg of everything among clients of the same true domain group. It needs
domain labels that a real federation never has; it is an upper reference, not a method."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fedmoe.aggregate.base import Aggregator, ClientInfo, MergeSpec, fedavg_within_groups
from fedmoe.errors import UsageError


@dataclass(frozen=True)
class OracleDomain(Aggregator):
    """FedAvg of everything within each true domain group."""

    name: ClassVar[str] = "oracle-domain"
    summary: ClassVar[str] = "reference: FedAvg within each true domain group (needs domain labels)"

    def spec(self, infos: list[ClientInfo], num_experts: int, gate_shared: bool) -> MergeSpec:
        if any(i.group is None for i in infos):
            raise UsageError(
                "oracle-domain needs each client's true domain group",
                hint="give --partition so the groups can be read from the domain counts",
            )
        return fedavg_within_groups(infos, num_experts, lambda i: i.group, self.name)
