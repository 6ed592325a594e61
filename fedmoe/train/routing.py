"""Routing statistics: which labels and domains each expert serves.

After local training a client runs its train split through the model once and counts, per expert,
the top-k assignments (overall, by label and by domain) and the mean gate probability. These are
the expert–domain and expert–label affinities that ``fedmoe affinity`` tabulates, and they travel
with the checkpoint (metadata ``routing``) at no cost in tensor bytes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from fedmoe.model import MoEClassifier


def layer_stats(routing: dict[str, Any] | None, layer: int) -> dict[str, Any] | None:
    """The statistics of MoE layer ``layer`` (routing JSON of fedmoe-moe/2, or the single layer of
    fedmoe-moe/1, which kept them at the top level); None when absent."""
    if not routing:
        return None
    layers = routing.get("layers")
    if layers is None:
        return routing if layer == 0 else None
    return layers[layer] if 0 <= layer < len(layers) else None


def routing_stats(
    model: MoEClassifier,
    x: torch.Tensor,
    labels: np.ndarray,
    domains: np.ndarray,
    num_domains: int,
    batch_size: int = 512,
) -> dict[str, Any]:
    """Per-expert routing counts over ``x``, for every MoE layer.

    Returns
    -------
    dict
        ``num_samples`` and ``layers``: one entry per MoE layer with ``topk_count`` (E,),
        ``mean_prob`` (E,), ``by_label`` (E, C) and ``by_domain`` (E, D) top-k assignment counts;
        plain lists, JSON-ready.
    """
    import torch

    with torch.no_grad():
        cfg = model.cfg
        num_experts, num_classes, num_layers = cfg.num_experts, cfg.num_classes, cfg.moe_layers
        model.eval()
        counts = np.zeros((num_layers, num_experts), dtype=np.int64)
        prob_sum = np.zeros((num_layers, num_experts), dtype=np.float64)
        by_label = np.zeros((num_layers, num_experts * num_classes), dtype=np.int64)
        by_domain = np.zeros((num_layers, num_experts * num_domains), dtype=np.int64)
        n = int(x.shape[0])
        for first in range(0, n, batch_size):
            h, routes = model.hidden(x[first : first + batch_size])  # (b, H)
            probs, _, experts = model.gate(h)  # (b, E), (b, k)
            all_routes = [(r.probs, r.experts) for r in routes] + [(probs, experts)]
            for layer, (p, chosen_t) in enumerate(all_routes):
                chosen = chosen_t.numpy()  # (b, k)
                k = chosen.shape[1]
                lab = np.repeat(labels[first : first + batch_size], k)  # (b·k,)
                dom = np.repeat(domains[first : first + batch_size], k)  # (b·k,)
                flat = chosen.reshape(-1)  # (b·k,)
                counts[layer] += np.bincount(flat, minlength=num_experts)
                prob_sum[layer] += p.double().sum(dim=0).numpy()
                by_label[layer] += np.bincount(
                    flat * num_classes + lab, minlength=num_experts * num_classes
                )
                by_domain[layer] += np.bincount(
                    flat * num_domains + dom, minlength=num_experts * num_domains
                )
        return {
            "num_samples": n,
            "layers": [
                {
                    "topk_count": counts[layer].tolist(),
                    "mean_prob": [round(float(p), 6) for p in prob_sum[layer] / max(n, 1)],
                    "by_label": by_label[layer].reshape(num_experts, num_classes).tolist(),
                    "by_domain": by_domain[layer].reshape(num_experts, num_domains).tolist(),
                }
                for layer in range(num_layers)
            ],
        }
