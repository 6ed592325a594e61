"""Expert proxies (FedMoE-DA, arXiv 2411.02115, Eq. 8): row j of client i's gating weight, g_{i,j},
stands for expert j at client i. Client-experts are numbered m = position(i)·E + j, clients in
increasing id order, so the numbering (and every result built on it) does not depend on the order
in which checkpoints were given."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ExpertIndex:
    """The client-expert numbering m ↔ (client, expert)."""

    clients: tuple[int, ...]  # client ids, increasing
    num_experts: int  # E

    @property
    def size(self) -> int:
        """M = N·E."""
        return len(self.clients) * self.num_experts

    def key(self, m: int) -> tuple[int, int]:
        """(client, expert) of client-expert ``m``."""
        return self.clients[m // self.num_experts], m % self.num_experts

    def index(self, client: int, expert: int) -> int:
        """m of (client, expert)."""
        return self.clients.index(client) * self.num_experts + expert


def stack_proxies(gates: dict[int, Any]) -> tuple[np.ndarray, ExpertIndex]:
    """Stack every client's (E, H) gate weight into the (N·E, H) float32 proxy matrix.

    Parameters
    ----------
    gates
        Client id → that client's ``gate.weight`` (a NumPy array or a torch tensor).
    """
    from fedmoe.affinity.topk import as_float32

    clients = tuple(sorted(gates))
    num_experts = int(gates[clients[0]].shape[0])
    matrix = np.concatenate([as_float32(gates[c]) for c in clients], axis=0)  # (N·E, H)
    return matrix, ExpertIndex(clients, num_experts)


@dataclass(frozen=True)
class Upload:
    """What one client sent the server after training: its gates' proxies, routing statistics and
    sample count (FedMoE-DA, arXiv 2411.02115, Sec. III, step 2); experts never travel this way."""

    client: int  # client id
    num_samples: int  # training samples (FedAvg weight)
    round: int  # the round it trained in (older than the current round: a stale upload)
    proxies: tuple[
        torch.Tensor | np.ndarray, ...
    ]  # (E, H) gate weight of each MoE layer (Eq. 8 proxies);
    # empty when the consumer needs none (a merge)
    routing: dict[str, Any] | None = None  # routing statistics of that training
    cluster: int | None = None  # clustered FL (IFCA): the cluster model it trained from
