"""The sparse aggregation matrix A of FedMoE-DA (arXiv 2411.02115, Eq. 9–10).

For each target client-expert (i, j), keep itself and its P most similar client-experts: the
threshold is the (P+1)-th largest similarity of its row, self included, and every entry reaching it
is kept (ties kept). Over the kept set the weights are a softmax with temperature τ:
``a = exp(r/τ) / Σ_kept exp(r/τ)``, so each row sums to one. P = 0 is the identity (no expert
aggregation), even when another proxy ties with the target's own similarity of 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedmoe.affinity.proxies import ExpertIndex
from fedmoe.affinity.topk import Neighbours
from fedmoe.errors import UsageError


@dataclass(frozen=True)
class AggregationMatrix:
    """A in CSR form over client-experts m = position(client)·E + expert."""

    index: ExpertIndex  # the numbering of rows and columns
    indptr: np.ndarray  # (M + 1,) int64
    sources: np.ndarray  # (nnz,) int64 source client-expert of each entry
    weights: np.ndarray  # (nnz,) float64, rows sum to 1
    similarity: np.ndarray  # (nnz,) float64 cosine similarity behind each weight

    def row(self, m: int) -> tuple[np.ndarray, np.ndarray]:
        """(sources, weights) of target ``m``."""
        lo, hi = int(self.indptr[m]), int(self.indptr[m + 1])
        return self.sources[lo:hi], self.weights[lo:hi]

    @property
    def targets(self) -> np.ndarray:
        """(nnz,) target client-expert of each entry."""
        return np.repeat(np.arange(self.index.size), np.diff(self.indptr))


def identity_matrix(index: ExpertIndex) -> AggregationMatrix:
    """A = I: every expert keeps itself."""
    m = index.size
    return AggregationMatrix(
        index,
        np.arange(m + 1, dtype=np.int64),
        np.arange(m, dtype=np.int64),
        np.ones(m),
        np.ones(m),
    )


def aggregation_matrix(
    neighbours: Neighbours, index: ExpertIndex, top_p: int, tau: float
) -> AggregationMatrix:
    """Eq. 9–10 from each row's largest similarities.

    Parameters
    ----------
    neighbours
        Each row's candidates, sorted by decreasing similarity (from ``topk_cosine``), with at
        least ``min(P + 1, M)`` entries per row.
    index
        Client-expert numbering.
    top_p
        P ≥ 0: similar client-experts kept besides the target itself.
    tau
        Softmax temperature τ > 0.
    """
    if top_p < 0:
        raise UsageError(f"--top-p must be >= 0, got {top_p}")
    if not tau > 0:
        raise UsageError(f"--tau must be > 0, got {tau}", hint="for example --tau 0.1")
    num = index.size
    if top_p == 0:
        return identity_matrix(index)
    need = min(top_p + 1, num)
    if neighbours.k < need:
        raise UsageError(
            f"--top-p {top_p} needs {need} candidates per row but the affinity kept {neighbours.k}",
            hint=f"re-run fedmoe affinity with --candidates {need} or more",
        )
    indptr = neighbours.indptr.numpy()
    cols = neighbours.indices.numpy()
    vals = neighbours.values.numpy().astype(np.float64)
    lengths = np.diff(indptr)  # (M,)
    thr = vals[indptr[:-1] + np.minimum(need, lengths) - 1]  # (M,) (P+1)-th largest
    keep = vals >= np.repeat(thr, lengths)  # rows are sorted: a prefix of each row
    counts = np.add.reduceat(keep.astype(np.int64), indptr[:-1]) if num else keep
    kept_cols, kept_vals = cols[keep], vals[keep]
    row_of = np.repeat(np.arange(num), counts)
    top = kept_vals[np.concatenate([[0], np.cumsum(counts)[:-1]])]  # (M,) row maxima
    expo = np.exp((kept_vals - top[row_of]) / tau)  # stable softmax
    sums = np.add.reduceat(expo, np.concatenate([[0], np.cumsum(counts)[:-1]]))
    new_ptr = np.zeros(num + 1, dtype=np.int64)
    np.cumsum(counts, out=new_ptr[1:])
    return AggregationMatrix(
        index, new_ptr, kept_cols.astype(np.int64), expo / sums[row_of], kept_vals
    )
