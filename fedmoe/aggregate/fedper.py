"""FedPer (Arivazhagan et al., "Federated Learning with Personalization Layers", 2019): the base
layers are federated with FedAvg, the personalisation layers never leave the client.

In fedmoe's models the MoE layers are the personal part: the shared tensors (the embedding φ,
norms, and in a language model attention, embeddings and lm_head) are averaged with sample weights,
while every gate and every expert stays with its client. For the built-in classifier, whose last
MoE layer produces the class logits, that is FedPer's "local head" exactly; with hidden MoE layers
it keeps them local too (a departure: FedPer chooses how many top layers are personal, here the
model schema's roles decide). FedRep (Collins et al., ICML 2021) shares this split and differs only
in how the client schedules its local epochs. The server moves the shared parts only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fedmoe.aggregate.base import Aggregator, MergeSpec, RoundInputs, fedavg_group
from fedmoe.aggregate.robust import ReduceParams
from fedmoe.model.schema import Role


@dataclass(frozen=True, kw_only=True)
class FedPer(ReduceParams, Aggregator):
    """Shared tensors averaged over every client; gates and experts personal."""

    name: ClassVar[str] = "fedper"
    summary: ClassVar[str] = "personalised layers: shared parts averaged, gates and experts local"
    moves: ClassVar[frozenset[Role]] = frozenset((Role.SHARED,))

    def spec(self, inputs: RoundInputs) -> MergeSpec:
        group = fedavg_group(inputs.clients, [inputs.uploads[c] for c in inputs.participants])
        return MergeSpec(
            self.name,
            inputs.clients,
            (group,),
            (),
            tuple(None for _ in inputs.schema.num_experts),
            self.reducer(),
        )
