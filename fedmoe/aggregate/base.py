"""The aggregator family: each method turns what the server knows about the clients into a
:class:`MergeSpec` (who averages with whom), and one engine applies any spec
(:mod:`fedmoe.aggregate.engine`) to checkpoints on disk or tensors in memory."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from fedmoe.affinity.proxies import ExpertIndex
from fedmoe.plan.matrix import AggregationMatrix


@dataclass(frozen=True)
class ClientInfo:
    """What an aggregator may use about one client."""

    client: int  # client id
    num_samples: int  # training samples (FedAvg weight)
    routing: dict[str, Any] | None = None  # routing statistics of its last training
    group: int | None = None  # true domain group (oracle reference only)


@dataclass(frozen=True)
class MergeSpec:
    """How every output model is built from the input models.

    ``shared[i]`` lists the (source client, weight) pairs averaged into client i's embedding (and
    gate, when ``gate_shared``); ``experts`` is the client-expert matrix of Eq. 11 (identity for
    methods that do not touch experts). A per-client gate that is not shared stays the client's own.
    """

    index: ExpertIndex  # client-expert numbering
    shared: dict[int, tuple[tuple[int, float], ...]]  # target client → embedding sources
    gate_shared: bool  # average G with the embedding (else each client keeps its own)
    experts: AggregationMatrix  # target client-expert → source client-experts and weights
    method: str  # the aggregator's name


def sample_weights(infos: list[ClientInfo]) -> tuple[tuple[int, float], ...]:
    """FedAvg weights n_i / Σ n over ``infos`` (uniform when every count is zero)."""
    counts = np.array([max(i.num_samples, 0) for i in infos], dtype=np.float64)
    total = counts.sum()
    w = counts / total if total > 0 else np.full(len(infos), 1.0 / max(len(infos), 1))
    return tuple((i.client, float(x)) for i, x in zip(infos, w, strict=True))


def same_index_matrix(
    index: ExpertIndex, weights: dict[int, dict[int, list[tuple[int, float]]]]
) -> AggregationMatrix:
    """A matrix where expert j of client i averages expert j of the listed clients.

    ``weights[i][j]`` is the list of (source client, weight) for target (i, j).
    """
    indptr = [0]
    sources: list[int] = []
    vals: list[float] = []
    for client in index.clients:
        for j in range(index.num_experts):
            for src, w in weights[client][j]:
                sources.append(index.index(src, j))
                vals.append(w)
            indptr.append(len(sources))
    w_arr = np.asarray(vals, dtype=np.float64)
    return AggregationMatrix(
        index,
        np.asarray(indptr, dtype=np.int64),
        np.asarray(sources, dtype=np.int64),
        w_arr,
        np.full(len(vals), np.nan),
    )


def fedavg_within_groups(
    infos: list[ClientInfo], num_experts: int, group: Callable[[ClientInfo], object], name: str
) -> MergeSpec:
    """Sample-weighted FedAvg of every parameter among clients with the same ``group(info)``:
    the embedding, the gate, and expert j with expert j (FedAvg is the case of one group)."""
    index = expert_index(infos, num_experts)
    shared: dict[int, tuple[tuple[int, float], ...]] = {}
    per: dict[int, dict[int, list[tuple[int, float]]]] = {}
    for info in infos:
        fed = sample_weights([i for i in infos if group(i) == group(info)])
        shared[info.client] = fed
        per[info.client] = {j: list(fed) for j in range(num_experts)}
    return MergeSpec(index, shared, True, same_index_matrix(index, per), name)


def expert_index(infos: list[ClientInfo], num_experts: int) -> ExpertIndex:
    """The client-expert numbering of ``infos`` (given in increasing client id order)."""
    return ExpertIndex(tuple(i.client for i in infos), num_experts)


class Aggregator(ABC):
    """Base class: ``name`` is the registry key, ``summary`` the line shown in ``--help``."""

    name: ClassVar[str]
    summary: ClassVar[str]

    @abstractmethod
    def spec(self, infos: list[ClientInfo], num_experts: int, gate_shared: bool) -> MergeSpec:
        """The merge this method performs for ``infos`` (clients in increasing id order)."""
