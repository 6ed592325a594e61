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
    e, n = index.num_experts, len(index.clients)
    clients = np.asarray(index.clients, dtype=np.int64)
    tgt = matrix.targets // e  # (nnz,) receiving client's position
    src = matrix.sources // e  # (nnz,) sending client's position
    remote = src != tgt
    # one int64 key per (sender, receiver, expert), sender-major: unique sorts and dedups at once
    keys = np.unique((src[remote] * n + tgt[remote]) * e + matrix.sources[remote] % e)
    out: list[Transfer] = []
    if keys.size == 0:
        return out
    pair, experts = keys // e, (keys % e).tolist()
    starts = np.flatnonzero(np.r_[True, pair[1:] != pair[:-1]])
    ends = np.append(starts[1:], keys.size).tolist()
    senders = clients[pair[starts] // n].tolist()
    receivers = clients[pair[starts] % n].tolist()
    for s, t, lo, hi in zip(senders, receivers, starts.tolist(), ends, strict=True):
        out.append(Transfer(s, t, layer, tuple(experts[lo:hi]), (hi - lo) * expert_bytes))
    return out
