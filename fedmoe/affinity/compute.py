"""One affinity pass over a round's uploads (FedMoE-DA, arXiv 2411.02115, Eq. 8): per MoE layer,
the proxies' top-k cosine neighbours and the expert–domain / expert–label share tables."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedmoe.affinity.domain import share_table
from fedmoe.affinity.proxies import ExpertIndex, Upload, stack_proxies
from fedmoe.affinity.topk import Neighbours, topk_cosine
from fedmoe.errors import InputError


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
    """Every MoE layer's affinity; each layer gets its own Eq. 9–10 matrix from it."""

    layers: tuple[LayerAffinity, ...]
    round: int  # the round of the freshest upload
    stale: tuple[int, ...]  # clients whose proxies are older than ``round`` (kept, marked)

    @property
    def clients(self) -> tuple[int, ...]:
        """Clients covered, increasing."""
        return self.layers[0].index.clients


def compute_affinity(uploads: Mapping[int, Upload], candidates: int, num_classes: int) -> Affinity:
    """Neighbours and share tables of every MoE layer for the clients in ``uploads``.

    Parameters
    ----------
    uploads
        Client id → its latest upload (fresh or stale).
    candidates
        Neighbours kept per row (itself included); plan-sync's P may be at most ``candidates - 1``.
    num_classes
        C, the width of the label table.
    """
    from fedmoe.train.routing import layer_stats

    if not uploads:
        raise InputError("no client checkpoints to compute affinity over")
    layer_counts = {len(u.proxies) for u in uploads.values()}
    if len(layer_counts) != 1:
        raise InputError(f"uploads with different numbers of MoE layers: {sorted(layer_counts)}")
    current = max(u.round for u in uploads.values())
    layers = []
    for layer in range(layer_counts.pop()):
        gates = {c: u.proxies[layer] for c, u in uploads.items()}
        shapes = {tuple(g.shape) for g in gates.values()}
        if len(shapes) != 1:
            raise InputError(
                f"MoE layer {layer}: gate weights of different shapes {sorted(shapes)}"
            )
        proxies, index = stack_proxies(gates)
        neighbours = topk_cosine(proxies, candidates)
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
    return Affinity(tuple(layers), current, stale)
