"""One affinity pass over a round's client checkpoints (FedMoE-DA, arXiv 2411.02115, Eq. 8): the
proxies' top-k cosine neighbours and the expert–domain / expert–label share tables."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedmoe.affinity.domain import share_table
from fedmoe.affinity.proxies import ExpertIndex, stack_proxies
from fedmoe.affinity.topk import Neighbours, topk_cosine
from fedmoe.errors import InputError


@dataclass(frozen=True)
class Affinity:
    """What the server learns from the uploaded gates and routing statistics."""

    index: ExpertIndex  # client-expert numbering
    neighbours: Neighbours  # each row's largest cosine similarities (ties kept)
    by_domain: np.ndarray  # (M, D) share of each client-expert's routed samples per domain
    by_label: np.ndarray  # (M, C) share per label


def compute_affinity(
    gates: dict[int, torch.Tensor],
    routing: dict[int, dict[str, Any] | None],
    candidates: int,
    num_classes: int,
) -> Affinity:
    """Neighbours and share tables for the clients in ``gates``.

    Parameters
    ----------
    gates
        Client id → (E, H) gate weight (the proxies).
    routing
        Client id → routing statistics (or None).
    candidates
        Neighbours kept per row (itself included); plan-sync's P may be at most ``candidates - 1``.
    num_classes
        C, the width of the label table.
    """
    if not gates:
        raise InputError("no client checkpoints to compute affinity over")
    shapes = {tuple(g.shape) for g in gates.values()}
    if len(shapes) != 1:
        raise InputError(f"gate weights of different shapes: {sorted(shapes)}")
    proxies, index = stack_proxies(gates)
    neighbours = topk_cosine(proxies, candidates)
    widths = [len(r["by_domain"][0]) for r in routing.values() if r and r.get("by_domain")]
    num_domains = max(widths, default=1)
    return Affinity(
        index,
        neighbours,
        share_table(routing, index, "by_domain", num_domains),
        share_table(routing, index, "by_label", num_classes),
    )
