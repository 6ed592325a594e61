"""FedAvg over the whole MoE: every parameter averaged, weighted by sample counts (McMahan et al.,
"Communication-Efficient Learning of Deep Networks from Decentralized Data", AISTATS 2017).

Under partial participation the new model goes to every client, participating or not, as in the
paper: one group whose sources are the round's participants and whose members are all clients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fedmoe.aggregate.base import (
    Aggregator,
    MergeSpec,
    RoundInputs,
    fedavg_group,
    whole_model_spec,
)
from fedmoe.aggregate.robust import ReduceParams


@dataclass(frozen=True, kw_only=True)
class FedAvg(ReduceParams, Aggregator):
    """Everything averaged with sample weights; one group of every client."""

    name: ClassVar[str] = "fedavg"
    summary: ClassVar[str] = "average every parameter, weighted by sample counts"

    def spec(self, inputs: RoundInputs) -> MergeSpec:
        group = fedavg_group(inputs.clients, [inputs.uploads[c] for c in inputs.participants])
        return whole_model_spec(self.name, inputs, (group,), self.reducer())
