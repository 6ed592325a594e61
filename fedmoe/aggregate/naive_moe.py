"""The naive MoE federation: embedding and gate averaged (sample-weighted); expert j averaged only
with expert j of the other clients, weighted by how many samples each client routed to it in that
MoE layer (its ``topk_count``), falling back to sample counts for a client without routing
statistics. Weighting by routed load rather than by client size is what keeps this distinct from
plain FedAvg. Every client receives the new model, participating or not."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fedmoe.aggregate.base import (
    Aggregator,
    ExpertGroup,
    MergeSpec,
    RoundInputs,
    SameIndex,
    fedavg_group,
)
from fedmoe.aggregate.robust import ReduceParams
from fedmoe.train.routing import layer_stats


@dataclass(frozen=True, kw_only=True)
class NaiveMoE(ReduceParams, Aggregator):
    """Shared parts averaged; expert j with expert j, weighted by routed samples."""

    name: ClassVar[str] = "naive-moe"
    summary: ClassVar[str] = "average shared parts; expert j with expert j, by routed samples"

    def spec(self, inputs: RoundInputs) -> MergeSpec:
        uploads = [inputs.uploads[c] for c in inputs.participants]
        group = fedavg_group(inputs.clients, uploads)
        layers = []
        for layer, num_experts in enumerate(inputs.schema.num_experts):
            load = np.zeros((len(uploads), num_experts))
            for pos, up in enumerate(uploads):
                stats = layer_stats(up.routing, layer)
                counts = None if stats is None else stats.get("topk_count")
                load[pos] = (
                    counts
                    if counts is not None and len(counts) == num_experts
                    else (up.num_samples)
                )
            rows = []
            for j in range(num_experts):
                col = load[:, j]
                w = col / col.sum() if col.sum() > 0 else np.full(len(uploads), 1 / len(uploads))
                rows.append(tuple(float(x) for x in w))
            layers.append(SameIndex((ExpertGroup(group.members, group.sources, tuple(rows)),)))
        return MergeSpec(
            self.name, inputs.clients, (group,), (group,), tuple(layers), self.reducer()
        )
