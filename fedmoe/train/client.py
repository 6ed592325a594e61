"""One client's round, as the CLI and the ``run`` orchestrator both use it: pick the client's
samples, train locally, count routing statistics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedmoe.data import Dataset
from fedmoe.model import MoEConfig, build_model
from fedmoe.partition import ClientSplit
from fedmoe.train.local import TrainConfig, TrainResult, fit
from fedmoe.train.routing import routing_stats


def client_seed(seed: int, round_: int, client: int) -> int:
    """The training seed of ``client`` in ``round_``: independent streams from one run seed."""
    return int(np.random.SeedSequence([seed, round_, client]).generate_state(1)[0])


def tensors(dataset: Dataset, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of ``indices`` as fresh (writable) tensors."""
    x = torch.from_numpy(np.array(dataset.x[indices], dtype=np.float32))  # (n, *input_shape)
    y = torch.from_numpy(np.array(dataset.y[indices], dtype=np.int64))  # (n,)
    return x, y


@dataclass(frozen=True)
class ClientUpdate:
    """What a client produces in one round."""

    client: int  # client id
    result: TrainResult  # trained tensors and loss curve
    routing: dict[str, Any]  # routing statistics on its train split
    num_samples: int  # train samples (the FedAvg weight)


def train_client(
    config: MoEConfig,
    state: dict[str, torch.Tensor],
    dataset: Dataset,
    split: ClientSplit,
    cfg: TrainConfig,
    seed: int,
    round_: int,
    client: int,
) -> ClientUpdate:
    """Train ``client`` for one round from ``state`` and measure its routing."""
    x, y = tensors(dataset, split.train)
    model = build_model(config, state)  # built once: trained, then measured
    result = fit(model, x, y, cfg, client_seed(seed, round_, client))
    routing = routing_stats(
        model,
        x,
        np.asarray(dataset.y[split.train]),
        np.asarray(dataset.domain[split.train]),
        dataset.num_domains,
    )
    return ClientUpdate(client, result, routing, int(split.train.size))
