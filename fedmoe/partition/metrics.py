"""Skew metrics: how far each client's label and domain distributions are from the global one.

Jensen–Shannon distance (base 2, in [0, 1]) and Hellinger distance (in [0, 1]), averaged over
clients; and the effective number of domains per client, exp(entropy).
"""

from __future__ import annotations

import numpy as np


def distributions(counts: np.ndarray) -> np.ndarray:
    """Row-normalise (N, K) counts; an empty row stays zero."""
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)


def js_distance(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen–Shannon distance (base 2) between rows of ``p`` (N, K) and the vector ``q`` (K,)."""
    m = 0.5 * (p + q[None, :])

    def kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        ratio = np.divide(a, b, out=np.ones_like(a), where=(a > 0) & (b > 0))
        return np.sum(a * np.log2(ratio), axis=1)

    div = 0.5 * kl(p, m) + 0.5 * kl(np.broadcast_to(q, p.shape), m)
    return np.sqrt(np.clip(div, 0.0, 1.0))


def hellinger(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Hellinger distance between rows of ``p`` (N, K) and ``q`` (K,)."""
    diff = np.sqrt(p) - np.sqrt(q)[None, :]
    return np.sqrt(0.5 * np.sum(diff * diff, axis=1))


def effective_number(p: np.ndarray) -> np.ndarray:
    """exp(Shannon entropy) of each row: 1 for a single category, K for uniform."""
    logp = np.log(p, out=np.zeros_like(p), where=p > 0)
    return np.exp(-np.sum(p * logp, axis=1))


def skew_metrics(label_counts: np.ndarray, domain_counts: np.ndarray) -> dict[str, float]:
    """Mean skew of clients' label and domain distributions against the pooled distribution.

    Parameters
    ----------
    label_counts, domain_counts
        (N, C) and (N, D) per-client counts.
    """
    out: dict[str, float] = {}
    for what, counts in (("label", label_counts), ("domain", domain_counts)):
        p = distributions(counts)
        q = counts.sum(axis=0) / max(counts.sum(), 1)
        out[f"{what}_js_mean"] = round(float(js_distance(p, q).mean()), 6)
        out[f"{what}_hellinger_mean"] = round(float(hellinger(p, q).mean()), 6)
        out[f"{what}_effective_mean"] = round(float(effective_number(p).mean()), 6)
    sizes = label_counts.sum(axis=1)
    out["size_min"] = int(sizes.min())
    out["size_max"] = int(sizes.max())
    out["size_cv"] = round(float(sizes.std() / max(sizes.mean(), 1e-12)), 6)
    return out
