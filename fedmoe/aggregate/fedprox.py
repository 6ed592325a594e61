"""FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020): FedAvg's
aggregation, with a proximal term mu/2 * ||w - w_t||^2 added to every client's local loss so that
local training on skewed data does not drift far from the round's global model w_t (Eq. 2).

The merge is FedAvg's (one sample-weighted group of every client). What differs is local training:
:meth:`FedProx.local_training` sets ``TrainConfig.prox_mu``, which ``fedmoe run`` and the Flower app
apply; by hand, train with ``fedmoe train-round --prox-mu MU``. Departure from the paper: clients
run a fixed number of epochs (no inexact-solution stopping rule, no dropped stragglers), as the
paper's own experiments with a fixed local budget do.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from fedmoe.aggregate.base import MergeSpec, RoundInputs
from fedmoe.aggregate.fedavg import FedAvg
from fedmoe.params import param
from fedmoe.train.config import TrainConfig


@dataclass(frozen=True, kw_only=True)
class FedProx(FedAvg):
    """FedAvg's merge; clients train with the proximal term mu/2 * ||w - w_t||^2."""

    name: ClassVar[str] = "fedprox"
    summary: ClassVar[str] = "FedAvg with a proximal term mu/2*||w - w_t||^2 in local training"

    mu: float = param(
        0.01, "proximal weight mu (the paper tunes it in {0.001, 0.01, 0.1, 1})", gt=0.0
    )

    def local_training(self, base: TrainConfig) -> TrainConfig:
        return dataclasses.replace(base, prox_mu=self.mu)

    def spec(self, inputs: RoundInputs) -> MergeSpec:
        return dataclasses.replace(super().spec(inputs), method=self.name)
