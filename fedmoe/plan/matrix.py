"""The sparse aggregation matrix A of FedMoE-DA (arXiv 2411.02115, Eq. 9–10).

For each target client-expert (i, j), keep itself and its P most similar client-experts: the
threshold is the (P+1)-th largest similarity of its row, self included, and every entry reaching it
is kept (ties kept). Over the kept set the weights are a softmax with temperature τ:
``a = exp(r/τ) / Σ_kept exp(r/τ)``, so each row sums to one. P = 0 is the identity (no expert
aggregation), even when another proxy ties with the target's own similarity of 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fedmoe.affinity.proxies import ExpertIndex
from fedmoe.errors import ParamError

if TYPE_CHECKING:
    from fedmoe.affinity.topk import Neighbours


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
        least ``min(P + 1, M)`` entries per row. When they carry plain cosines besides a
        ranking score (centred proxies, :mod:`fedmoe.affinity.centre`), the score chooses the
        kept set and the plain cosine weighs it.
    index
        Client-expert numbering.
    top_p
        P ≥ 0: similar client-experts kept besides the target itself.
    tau
        Softmax temperature τ > 0.
    """
    if top_p < 0:
        raise ParamError("top_p", top_p, "must be >= 0")
    if not tau > 0:
        raise ParamError("tau", tau, "must be > 0", hint="for example 0.1")
    num = index.size
    if top_p == 0:
        return identity_matrix(index)
    need = min(top_p + 1, num)
    if neighbours.k < need:
        raise ParamError(
            "top_p",
            top_p,
            f"{top_p} needs {need} candidates per row but the affinity kept {neighbours.k}",
            hint=f"re-run fedmoe affinity with --candidates {need} or more",
            show=False,
        )
    indptr = neighbours.indptr
    cols = neighbours.indices
    vals = neighbours.values.astype(np.float64)
    lengths = np.diff(indptr)  # (M,)
    thr = vals[indptr[:-1] + np.minimum(need, lengths) - 1]  # (M,) (P+1)-th largest
    keep = vals >= np.repeat(thr, lengths)  # rows are sorted: a prefix of each row
    counts = np.add.reduceat(keep.astype(np.int64), indptr[:-1]) if num else keep
    kept_cols = cols[keep]
    kept_vals = neighbours.weight_values.astype(np.float64)[keep]  # what Eq. 10 weighs
    row_of = np.repeat(np.arange(num), counts)
    firsts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    top = np.maximum.reduceat(kept_vals, firsts) if kept_vals.size else kept_vals  # row maxima
    expo = np.exp((kept_vals - top[row_of]) / tau)  # stable softmax
    sums = np.add.reduceat(expo, firsts)
    new_ptr = np.zeros(num + 1, dtype=np.int64)
    np.cumsum(counts, out=new_ptr[1:])
    return AggregationMatrix(
        index, new_ptr, kept_cols.astype(np.int64), expo / sums[row_of], kept_vals
    )


def client_prior(neighbours: Neighbours, index: ExpertIndex, top_clients: int) -> Neighbours:
    """Each row's candidates restricted to experts of the row's own client and of the
    ``top_clients`` clients most similar to it (0: unchanged). Beyond the paper: a client's
    similarity to another is the mean over its experts of the best candidate similarity to one of
    the other's experts (0 where none is a candidate), which separates domains more cleanly than
    single expert pairs do; Eq. 9–10 then choose among the experts of similar clients only."""
    if top_clients <= 0:
        return neighbours

    e, n = index.num_experts, len(index.clients)
    indptr = neighbours.indptr
    cols = neighbours.indices
    vals = neighbours.values.astype(np.float64)
    rows = np.repeat(np.arange(index.size), np.diff(indptr))
    own, other = rows // e, cols // e  # client positions of each entry
    # best similarity of each row to each other client, then summed over the client's experts
    pair_rows = rows * n + other
    uniq, inv = np.unique(pair_rows, return_inverse=True)
    best = np.full(uniq.size, -np.inf)
    np.maximum.at(best, inv, vals)
    client_pair = (uniq // n // e) * n + uniq % n
    cp, cinv = np.unique(client_pair, return_inverse=True)
    score = np.bincount(cinv, weights=best) / e
    a, b = cp // n, cp % n
    cand = a != b
    a, b, score = a[cand], b[cand], score[cand]
    order = np.lexsort((b, -score, a))  # per client: most similar first (ties: lower position)
    a, b = a[order], b[order]
    first = np.searchsorted(a, np.arange(n))
    rank = np.arange(a.size) - first[a]
    allowed = set((a[rank < top_clients] * n + b[rank < top_clients]).tolist())
    keep = (own == other) | np.isin(own * n + other, np.fromiter(allowed, dtype=np.int64))
    counts = np.bincount(rows[keep], minlength=index.size)
    new_ptr = np.zeros(index.size + 1, dtype=np.int64)
    np.cumsum(counts, out=new_ptr[1:])
    return neighbours.subset(new_ptr, keep)


def drop_small(matrix: AggregationMatrix, min_weight: float) -> AggregationMatrix:
    """``matrix`` without the sources whose weight is below ``min_weight``, each row renormalised
    (the target's own entry is always kept, so no row empties). Beyond the paper: a remote source
    that would contribute a few percent of a merged expert still costs a whole expert of
    peer-to-peer traffic."""
    if min_weight <= 0:
        return matrix
    targets = matrix.targets
    keep = (matrix.weights >= min_weight) | (matrix.sources == targets)
    counts = np.bincount(targets[keep], minlength=matrix.index.size)
    indptr = np.zeros(matrix.index.size + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    weights = matrix.weights[keep]
    sums = np.bincount(targets[keep], weights=weights, minlength=matrix.index.size)
    return AggregationMatrix(
        matrix.index,
        indptr,
        matrix.sources[keep],
        weights / sums[targets[keep]],
        matrix.similarity[keep],
    )


def restrict(matrix: AggregationMatrix, clients: tuple[int, ...] | list[int]) -> AggregationMatrix:
    """The rows of ``matrix`` whose target client is in ``clients``, keeping only sources of those
    clients, each row renormalised to sum to one: the rows applied in a round where only
    ``clients`` take part. The result is numbered over ``clients`` (increasing). The target's own
    entry is kept by Eq. 9–10; a row whose every source sat out (possible in a hand-edited plan)
    becomes the identity. A client the matrix does not cover (it had not uploaded yet when the
    matrix was built) gets identity rows: it keeps its experts until the next refresh covers it.
    """
    keep = tuple(sorted(int(c) for c in clients))
    index = matrix.index
    if keep == index.clients:
        return matrix
    e = index.num_experts
    pos_old = {c: i for i, c in enumerate(index.clients)}
    remap = np.full(index.size, -1, dtype=np.int64)  # old client-expert → new, or -1
    for new_pos, c in enumerate(keep):
        if c in pos_old:
            old = pos_old[c]
            remap[old * e : (old + 1) * e] = np.arange(new_pos * e, (new_pos + 1) * e)
    srcs: list[np.ndarray] = []
    wts: list[np.ndarray] = []
    sims: list[np.ndarray] = []
    counts: list[int] = []
    for new_pos, c in enumerate(keep):
        for j in range(e):
            ok = np.zeros(0, dtype=bool)
            if c in pos_old:
                m = pos_old[c] * e + j
                lo, hi = int(matrix.indptr[m]), int(matrix.indptr[m + 1])
                src = remap[matrix.sources[lo:hi]]
                ok = src >= 0
                w = matrix.weights[lo:hi][ok]
            if not ok.any() or not w.sum() > 0:
                # not covered, or every source sat out (a row without its own expert): identity
                srcs.append(np.array([new_pos * e + j], dtype=np.int64))
                wts.append(np.ones(1))
                sims.append(np.ones(1))
                counts.append(1)
                continue
            srcs.append(src[ok])
            wts.append(w / w.sum())
            sims.append(matrix.similarity[lo:hi][ok])
            counts.append(int(ok.sum()))
    indptr = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return AggregationMatrix(
        ExpertIndex(keep, e),
        indptr,
        np.concatenate(srcs) if srcs else np.zeros(0, np.int64),
        np.concatenate(wts) if wts else np.zeros(0),
        np.concatenate(sims) if sims else np.zeros(0),
    )
