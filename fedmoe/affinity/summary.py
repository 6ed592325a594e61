"""A summary of an affinity pass that people read: how each client-expert's nearest other
client-expert relates to it (another client? the same dominant true domain?)."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedmoe.affinity.compute import Affinity, LayerAffinity
from fedmoe.affinity.domain import dominant


def summary(aff: Affinity) -> dict[str, Any]:
    """How the nearest other client-expert of each row relates to it (over every MoE layer)."""
    parts = [_layer_summary(la) for la in aff.layers]
    out: dict[str, Any] = {
        "client_experts": parts[0]["client_experts"],
        "stale_clients": len(aff.stale),
    }
    for key in (
        "mean_nearest_similarity",
        "nearest_is_other_client",
        "nearest_same_dominant_domain",
        "mean_dominant_domain_share",
    ):
        values = [p[key] for p in parts if p[key] is not None]
        out[key] = round(float(np.mean(values)), 6) if values else None
    if len(parts) > 1:
        out["layers"] = parts
    return out


def _layer_summary(aff: LayerAffinity) -> dict[str, Any]:
    index = aff.index
    nb = aff.neighbours
    dom, share = dominant(aff.by_domain)
    rows = np.repeat(np.arange(index.size), np.diff(nb.indptr))  # (nnz,) row of each entry
    other = nb.indices != rows  # entries that are not the row itself
    # each row's nearest other entry: rows are sorted, so the first one that is not itself
    first_rows, first = np.unique(rows[other], return_index=True)
    near = nb.indices[other][first]  # (R,) nearest other client-expert of each such row
    sims = nb.values[other][first].astype(np.float64)
    e = index.num_experts
    other_client = near // e != first_rows // e
    known = (dom[first_rows] >= 0) & (dom[near] >= 0)
    same_domain = dom[first_rows][known] == dom[near][known]

    def mean(x: np.ndarray) -> float | None:
        return round(float(np.mean(x)), 6) if x.size else None

    return {
        "client_experts": index.size,
        "mean_nearest_similarity": mean(sims),
        "nearest_is_other_client": mean(other_client),
        "nearest_same_dominant_domain": mean(same_domain),
        "mean_dominant_domain_share": round(float(share.mean()), 6),
    }
