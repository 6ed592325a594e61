"""One client's round, as the CLI and the ``run`` orchestrator both use it: pick the client's
samples, (for clustered FL) pick the start model among candidates, train locally, count routing
statistics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedmoe.data import Dataset
from fedmoe.model import MoEClassifier, MoEConfig, build_model, holding
from fedmoe.partition import ClientSplit
from fedmoe.train.cohort import fit_cohort
from fedmoe.train.cohort import supported as cohort_supported
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
    choice: int | None = None  # the candidate it started from (clustered FL), if it had several
    candidate_losses: tuple[float, ...] = ()  # each candidate's mean loss on the train split


@torch.no_grad()
def mean_loss(config: MoEConfig, state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
              batch_size: int = 1024) -> float:  # fmt: skip
    """Mean cross-entropy of the model in ``state`` on ``(x, y)`` (eval mode)."""
    model = build_model(config, state)
    model.eval()
    total = 0.0
    for first in range(0, int(y.shape[0]), batch_size):
        logits = model(x[first : first + batch_size]).logits
        ce = torch.nn.functional.cross_entropy(
            logits, y[first : first + batch_size], reduction="sum"
        )
        total += float(ce)
    return total / max(int(y.shape[0]), 1)


def choose(
    config: MoEConfig, candidates: tuple[dict[str, torch.Tensor], ...], x: torch.Tensor,
    y: torch.Tensor,
) -> tuple[int, tuple[float, ...]]:  # fmt: skip
    """IFCA's cluster identity estimate (Ghosh et al., NeurIPS 2020, Alg. 1): the candidate with
    the lowest loss on the client's train split (the lowest index on a tie), and every loss."""
    losses = tuple(mean_loss(config, s, x, y) for s in candidates)
    return min(range(len(losses)), key=lambda k: (losses[k], k)), losses


def train_cohort(
    config: MoEConfig,
    states: list[dict[str, torch.Tensor]],
    dataset: Dataset,
    splits: list[ClientSplit],
    cfg: TrainConfig,
    seed: int,
    round_: int,
    clients: list[int],
    candidates: tuple[dict[str, torch.Tensor], ...] = (),
) -> list[ClientUpdate]:
    """:func:`train_client` for every client of ``clients`` (starting from ``states``, or each
    from its choice among ``candidates``), trained together as one cohort where the model allows
    it (:mod:`fedmoe.train.cohort`: the same tensors, bit for bit, several times faster)."""
    data = [tensors(dataset, split.train) for split in splits]
    picks: list[tuple[int | None, tuple[float, ...]]] = [(None, ())] * len(clients)
    if candidates:
        picks = [choose(config, candidates, x, y) for x, y in data]
        states = [candidates[choice] for choice, _ in picks if choice is not None]
    seeds = [client_seed(seed, round_, c) for c in clients]
    models: list[MoEClassifier] | None = None
    if len(clients) > 1 and cohort_supported(config, cfg):
        results = fit_cohort(config, states, data, cfg, seeds)
    else:  # client by client, each model built once: trained, then measured
        models = [build_model(config, s) for s in states]
        results = [fit(m, x, y, cfg, k) for m, (x, y), k in zip(models, data, seeds, strict=True)]
    reused: MoEClassifier | None = None  # after a cohort: one module takes each result in turn
    updates = []
    for i, (c, split, (x, _), result, (choice, losses)) in enumerate(
        zip(clients, splits, data, results, picks, strict=True)
    ):
        model = models[i] if models is not None else holding(reused, config, result.state)
        reused = model if models is None else None
        routing = routing_stats(
            model,
            x,
            np.asarray(dataset.y[split.train]),
            np.asarray(dataset.domain[split.train]),
            dataset.num_domains,
        )
        updates.append(ClientUpdate(c, result, routing, int(split.train.size), choice, losses))
    return updates


def train_client(
    config: MoEConfig,
    state: dict[str, torch.Tensor],
    dataset: Dataset,
    split: ClientSplit,
    cfg: TrainConfig,
    seed: int,
    round_: int,
    client: int,
    candidates: tuple[dict[str, torch.Tensor], ...] = (),
) -> ClientUpdate:
    """Train ``client`` for one round from ``state`` (or, given ``candidates``, from the one with
    the lowest loss on its train split) and measure its routing (a cohort of one)."""
    (update,) = train_cohort(
        config, [state], dataset, [split], cfg, seed, round_, [client], candidates
    )
    return update
