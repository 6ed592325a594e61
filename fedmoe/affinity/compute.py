"""One affinity pass over a round's uploads (FedMoE-DA, arXiv 2411.02115, Eq. 8): per MoE layer,
the proxies' top-k cosine neighbours and the expert–domain / expert–label share tables."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fedmoe.affinity.centre import centred_neighbours
from fedmoe.affinity.domain import share_table
from fedmoe.affinity.proxies import ExpertIndex, Upload, stack_proxies
from fedmoe.affinity.topk import Neighbours, as_float32, topk_cosine
from fedmoe.errors import InputError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class LayerAffinity:
    """What the server learns of one MoE layer from the uploaded gates and routing statistics."""

    layer: int  # MoE layer index
    index: ExpertIndex  # client-expert numbering
    neighbours: Neighbours  # each row's largest cosine similarities (ties kept)
    by_domain: np.ndarray  # (M, D) share of each client-expert's routed samples per domain
    by_label: np.ndarray  # (M, C) share per label


@dataclass(frozen=True)
class Affinity:
    """Every MoE layer's affinity; each layer gets its own Eq. 9–10 matrix from it (the same one
    for every layer when ``pooled``)."""

    layers: tuple[LayerAffinity, ...]
    round: int  # the round of the freshest upload
    stale: tuple[int, ...]  # clients whose proxies are older than ``round`` (kept, marked)
    pooled: bool = False  # one neighbour list for every layer, from the layers' proxies together
    centred: bool = False  # sources ranked by centred proxies (:mod:`fedmoe.affinity.centre`)

    @property
    def clients(self) -> tuple[int, ...]:
        """Clients covered, increasing."""
        return self.layers[0].index.clients


def pooled_proxies(gates: list[torch.Tensor | np.ndarray]) -> np.ndarray:
    """One client's proxies over every MoE layer: row j is the concatenation of expert j's
    unit-norm gate rows of each layer, divided by √L, so the cosine of two pooled rows is the mean
    over layers of their per-layer cosines."""
    scale = np.float32(1.0 / len(gates) ** 0.5)
    parts = []
    for gate in gates:
        g = as_float32(gate)
        norms = np.linalg.norm(g, axis=1, keepdims=True)
        parts.append(np.where(norms > 0, g / np.maximum(norms, 1e-30), g) * scale)
    return np.concatenate(parts, axis=1).astype(np.float32)  # (E, Σ H_l)


def compute_affinity(
    uploads: Mapping[int, Upload],
    candidates: int,
    num_classes: int,
    pooled: bool = False,
    centred: bool = False,
) -> Affinity:
    """Neighbours and share tables of every MoE layer for the clients in ``uploads``.

    Parameters
    ----------
    uploads
        Client id → its latest upload (fresh or stale).
    candidates
        Neighbours kept per row (itself included); plan-sync's P may be at most ``candidates - 1``.
    num_classes
        C, the width of the label table.
    pooled
        Pool the MoE layers (beyond the paper, which has one MoE layer): expert j of a client is
        compared across every layer at once (:func:`pooled_proxies`), and every layer gets the
        same neighbours, hence the same matrix. For models whose expert j serves one domain in
        every layer (experts upcycled from one dense model per domain); it needs the same E in
        every layer. Share tables stay per layer.
    centred
        Rank each client-expert's candidates among the same expert of the other clients by the
        cosine of proxies centred on that expert's median row (beyond the paper, against hubs
        such as ALIE uploads: :mod:`fedmoe.affinity.centre`); the plain cosines stay beside the
        ranking for Eq. 10's weights.
    """
    from fedmoe.train.routing import layer_stats

    if not uploads:
        raise InputError("no client checkpoints to compute affinity over")
    layer_counts = {len(u.proxies) for u in uploads.values()}
    if len(layer_counts) != 1:
        raise InputError(f"uploads with different numbers of MoE layers: {sorted(layer_counts)}")
    current = max(u.round for u in uploads.values())
    num_layers = layer_counts.pop()
    shared: Neighbours | None = None
    if pooled and num_layers > 1:
        experts = {int(g.shape[0]) for u in uploads.values() for g in u.proxies}
        if len(experts) != 1:
            raise InputError(
                f"pooling the MoE layers needs one expert count in every layer, got {sorted(experts)}",
                hint="compute a matrix per layer (leave pool_layers off)",
            )
        for layer in range(num_layers):
            found = {tuple(u.proxies[layer].shape) for u in uploads.values()}
            if len(found) != 1:
                raise InputError(
                    f"MoE layer {layer}: gate weights of different shapes {sorted(found)}"
                )
        pooled_rows, pooled_index = stack_proxies(
            {c: pooled_proxies(list(u.proxies)) for c, u in uploads.items()}
        )
        shared = neighbours_of(pooled_rows, pooled_index, candidates, centred)
    layers = []
    for layer in range(num_layers):
        gates = {c: u.proxies[layer] for c, u in uploads.items()}
        shapes = {tuple(g.shape) for g in gates.values()}
        if len(shapes) != 1:
            raise InputError(
                f"MoE layer {layer}: gate weights of different shapes {sorted(shapes)}"
            )
        proxies, index = stack_proxies(gates)
        neighbours = (
            shared if shared is not None else neighbours_of(proxies, index, candidates, centred)
        )
        stats = {c: layer_stats(u.routing, layer) for c, u in uploads.items()}
        widths = [len(r["by_domain"][0]) for r in stats.values() if r and r.get("by_domain")]
        num_domains = max(widths, default=1)
        layers.append(
            LayerAffinity(
                layer,
                index,
                neighbours,
                share_table(stats, index, "by_domain", num_domains),
                share_table(stats, index, "by_label", num_classes),
            )
        )
    stale = tuple(sorted(c for c, u in uploads.items() if u.round < current))
    return Affinity(tuple(layers), current, stale, shared is not None, centred)


def neighbours_of(
    proxies: np.ndarray, index: ExpertIndex, candidates: int, centred: bool
) -> Neighbours:
    """Each row's candidates: the plain cosine top-k (the paper), or the centred ranking."""
    if centred:
        return centred_neighbours(proxies, index, candidates)
    return topk_cosine(proxies, candidates, overwrite=True)  # our own stack
