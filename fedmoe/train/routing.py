"""Routing statistics: which labels and domains each expert serves.

After local training a client runs its train split through the model once and counts, per expert,
the top-k assignments (overall, by label and by domain) and the mean gate probability. These are
the expert–domain and expert–label affinities that ``fedmoe affinity`` tabulates, and they travel
with the checkpoint (metadata ``routing``) at no cost in tensor bytes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedmoe.model import MoEClassifier


@torch.no_grad()
def routing_stats(
    model: MoEClassifier,
    x: torch.Tensor,
    labels: np.ndarray,
    domains: np.ndarray,
    num_domains: int,
    batch_size: int = 512,
) -> dict[str, Any]:
    """Per-expert routing counts over ``x``.

    Returns
    -------
    dict
        ``num_samples``; ``topk_count`` (E,); ``mean_prob`` (E,); ``by_label`` (E, C) and
        ``by_domain`` (E, D) top-k assignment counts; plain lists, JSON-ready.
    """
    cfg = model.cfg
    num_experts, num_classes = cfg.num_experts, cfg.num_classes
    model.eval()
    counts = np.zeros(num_experts, dtype=np.int64)
    prob_sum = np.zeros(num_experts, dtype=np.float64)
    by_label = np.zeros(num_experts * num_classes, dtype=np.int64)
    by_domain = np.zeros(num_experts * num_domains, dtype=np.int64)
    n = int(x.shape[0])
    for first in range(0, n, batch_size):
        h = model.embed(x[first : first + batch_size])  # (b, H)
        probs, _, experts = model.gate(h)  # (b, E), (b, k)
        chosen = experts.numpy()  # (b, k)
        k = chosen.shape[1]
        lab = np.repeat(labels[first : first + batch_size], k)  # (b·k,)
        dom = np.repeat(domains[first : first + batch_size], k)  # (b·k,)
        flat = chosen.reshape(-1)  # (b·k,)
        counts += np.bincount(flat, minlength=num_experts)
        prob_sum += probs.double().sum(dim=0).numpy()
        by_label += np.bincount(flat * num_classes + lab, minlength=num_experts * num_classes)
        by_domain += np.bincount(flat * num_domains + dom, minlength=num_experts * num_domains)
    return {
        "num_samples": n,
        "topk_count": counts.tolist(),
        "mean_prob": [round(float(p), 6) for p in prob_sum / max(n, 1)],
        "by_label": by_label.reshape(num_experts, num_classes).tolist(),
        "by_domain": by_domain.reshape(num_experts, num_domains).tolist(),
    }
