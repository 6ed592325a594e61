"""Expert–domain and expert–label affinity from routing statistics: for each client-expert, the
share of its top-k assignments that came from each domain (label). A row concentrated on one domain
says the expert specialised on it; rows of different clients that peak on the same domain are the
experts FedMoE-DA (arXiv 2411.02115) should aggregate together."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedmoe.affinity.proxies import ExpertIndex


def share_table(
    routing: dict[int, dict[str, Any] | None], index: ExpertIndex, key: str, width: int
) -> np.ndarray:
    """(M, width) row-normalised shares of ``routing[client][key]`` (``by_domain``/``by_label``).

    Clients without routing statistics (e.g. never trained) get rows of zeros.
    """
    table = np.zeros((index.size, width))
    for pos, client in enumerate(index.clients):
        stats = routing.get(client)
        if not stats or key not in stats:
            continue
        counts = np.asarray(stats[key], dtype=np.float64)  # (E, width)
        totals = counts.sum(axis=1, keepdims=True)
        rows = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
        table[pos * index.num_experts : (pos + 1) * index.num_experts, : rows.shape[1]] = rows
    return table


def dominant(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's dominant column and its share (column -1 for an all-zero row)."""
    if table.shape[1] == 0:  # no labels (a language model)
        return np.full(table.shape[0], -1), np.zeros(table.shape[0])
    arg = table.argmax(axis=1)
    share = table.max(axis=1)
    return np.where(share > 0, arg, -1), share
