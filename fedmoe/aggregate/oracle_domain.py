"""The oracle reference: FedAvg of everything among clients of the same true domain group. It needs
domain labels that a real federation never has; it is an upper reference, not a method.

Each group's new model goes to every client of the group, participating or not; a group with no
participant this round keeps its models."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fedmoe.aggregate.base import (
    Aggregator,
    Group,
    MergeSpec,
    RoundInputs,
    fedavg_group,
    whole_model_spec,
)
from fedmoe.aggregate.robust import ReduceParams
from fedmoe.errors import UsageError


@dataclass(frozen=True, kw_only=True)
class OracleDomain(ReduceParams, Aggregator):
    """FedAvg of everything within each true domain group."""

    name: ClassVar[str] = "oracle-domain"
    summary: ClassVar[str] = "reference: FedAvg within each true domain group (needs domain labels)"

    def spec(self, inputs: RoundInputs) -> MergeSpec:
        missing = [c for c in inputs.clients if c not in inputs.groups]
        if missing:
            raise UsageError(
                f"oracle-domain needs each client's true domain group (client {missing[0]} has none)",
                hint="give --partition so the groups can be read from the domain counts",
            )
        groups: list[Group] = []
        for g in sorted(set(inputs.groups[c] for c in inputs.clients)):
            members = tuple(c for c in inputs.clients if inputs.groups[c] == g)
            present = [inputs.uploads[c] for c in inputs.participants if inputs.groups[c] == g]
            if present:
                groups.append(fedavg_group(members, present))
        return whole_model_spec(self.name, inputs, tuple(groups), self.reducer())
