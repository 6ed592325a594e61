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
    same_domain, other_client, sims = [], [], []
    for m in range(index.size):
        cols, vals = nb.row(m)
        others = [(int(c), float(v)) for c, v in zip(cols, vals, strict=True) if int(c) != m]
        if not others:
            continue
        c, v = others[0]
        sims.append(v)
        other_client.append(index.key(c)[0] != index.key(m)[0])
        if dom[m] >= 0 and dom[c] >= 0:
            same_domain.append(dom[m] == dom[c])
    return {
        "client_experts": index.size,
        "mean_nearest_similarity": round(float(np.mean(sims)), 6) if sims else None,
        "nearest_is_other_client": round(float(np.mean(other_client)), 6) if other_client else None,
        "nearest_same_dominant_domain": round(float(np.mean(same_domain)), 6)
        if same_domain
        else None,
        "mean_dominant_domain_share": round(float(share.mean()), 6),
    }
