"""The peer-to-peer transfer list implied by A (FedMoE-DA, arXiv 2411.02115, Eq. 11): client
i needs θ_{i',j'} of MoE layer l for every kept source with i' ≠ i and fetches it directly from
peer i', once, however many of its own experts use it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedmoe.plan.matrix import AggregationMatrix


@dataclass(frozen=True)
class Transfer:
    """Experts of one MoE layer that one client sends another."""

    source: int  # client that sends
    target: int  # client that fetches
    layer: int  # MoE layer
    experts: tuple[int, ...]  # expert indices j' of the sender, increasing
    bytes: int  # len(experts) × bytes per expert of this layer


def transfer_list(matrix: AggregationMatrix, expert_bytes: int, layer: int = 0) -> list[Transfer]:
    """Every (sender → receiver) pair with the experts it moves, ordered by (sender, receiver)."""
    index = matrix.index
    e = index.num_experts
    clients = np.asarray(index.clients, dtype=np.int64)
    tgt = clients[matrix.targets // e]  # (nnz,) receiving client
    src = clients[matrix.sources // e]  # (nnz,) sending client
    exp = matrix.sources % e  # (nnz,) sent expert
    remote = src != tgt
    triples = np.unique(np.stack([src[remote], tgt[remote], exp[remote]], axis=1), axis=0)
    out: list[Transfer] = []
    if triples.size == 0:
        return out
    pairs, starts = np.unique(triples[:, :2], axis=0, return_index=True)
    ends = np.append(starts[1:], triples.shape[0])
    for (s, t), lo, hi in zip(pairs, starts, ends, strict=True):
        experts = tuple(int(x) for x in triples[lo:hi, 2])
        out.append(Transfer(int(s), int(t), layer, experts, len(experts) * expert_bytes))
    return out
