"""IFCA, the Iterative Federated Clustering Algorithm (Ghosh, Chung, Yin and Ramchandran, "An
Efficient Framework for Clustered Federated Learning", NeurIPS 2020, Alg. 1, model averaging): the
server keeps k cluster models; each participant estimates its cluster as the model with the lowest
loss on its own train split, trains that model, and the server averages each cluster's trained
models (sample-weighted) into the cluster's next model. It must discover the groups itself: it never
sees domain labels, unlike the oracle.

The choice is made on the client (:func:`fedmoe.train.client.choose`; ``fedmoe train-round
--candidates``) and travels in each trained checkpoint's ``cluster`` metadata. This file only groups
the round's participants by that choice: each group's average goes to the group's members. A
client that sat the round out keeps its model, and a cluster nobody chose keeps its model too; the
engines keep the k cluster models between rounds (``fedmoe run`` writes them to each round's
``clusters/``). The k initial models differ (the paper initialises them at random): cluster 0 is
the run's initial model and cluster c > 0 is initialised from a seed derived from (seed, c), so k = 1
is FedAvg under full participation. Departure: no weight sharing between the cluster models (the
paper's variant that shares all but the last layers).
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
from fedmoe.errors import InputError
from fedmoe.params import param


@dataclass(frozen=True, kw_only=True)
class IFCA(ReduceParams, Aggregator):
    """k cluster models; each participant joins the one that fits its data best."""

    name: ClassVar[str] = "ifca"
    summary: ClassVar[str] = (
        "clustered FL: k models, each client trains the one with its lowest loss"
    )
    uses_clusters: ClassVar[bool] = True

    clusters: int = param(
        4, "number of cluster models k (the paper assumes the number of groups is known)", ge=1
    )

    def spec(self, inputs: RoundInputs) -> MergeSpec:
        chosen: dict[int, list[int]] = {}
        for c in inputs.participants:
            k = inputs.uploads[c].cluster
            if k is None:
                raise InputError(
                    f"client {c}'s checkpoint records no cluster choice; ifca needs one",
                    hint="train with fedmoe train-round --candidates (the k cluster models)",
                )
            if not 0 <= k < self.clusters:
                raise InputError(
                    f"client {c} chose cluster {k}, but ifca has {self.clusters} cluster models",
                    hint="merge with -p clusters=K, K the number of candidates trained from",
                )
            chosen.setdefault(k, []).append(c)
        part = tuple(
            fedavg_group(tuple(members), [inputs.uploads[c] for c in members])
            for _, members in sorted(chosen.items())
        )
        return whole_model_spec(self.name, inputs, part, self.reducer())
