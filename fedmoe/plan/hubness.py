"""Hubness correction of the expert similarities before Eq. 9–10 (beyond the paper).

FedMoE-DA (arXiv 2411.02115, Eq. 9–10) gives each target expert its P most similar client-experts.
In a high-dimensional space some points are near *everyone* — hubs — and they are chosen as
sources by many targets whatever their domain. A malicious client can make its experts hubs on
purpose: ALIE-style uploads (Baruch et al., NeurIPS 2019) sit a small shift away from the benign
mean, so their gate rows are close to every client's (measured on the quickstart: the paper's
rows give the 4 of 20 malicious clients 57–68 % of the remote weight under ALIE, against 20 %
for the same clients when they are honest).

CSLS (cross-domain similarity local scaling; Conneau et al., "Word Translation Without Parallel
Data", ICLR 2018) discounts hubs: each client-expert m gets its hubness r_m, the mean similarity
to its k nearest other client-experts, and a candidate pair's score becomes
``s(t, m) − (r_t + r_m) / 2`` (CSLS / 2, so that scores keep the scale of a cosine and the
temperature τ means what it means for plain similarities). Within a target's row r_t is a
constant, so the ranking, and the softmax, see ``s − r_m / 2``: a source that is close to
everybody loses rank against one that is close to this target in particular. On the same runs
the malicious clients' remote weight under ALIE fell to 24–34 % with k = 5.

Each r_m comes from row m's own candidates (the affinity keeps ``candidates`` per row), so no
similarity beyond the artefact's is needed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fedmoe.errors import ParamError

if TYPE_CHECKING:
    from fedmoe.affinity.topk import Neighbours


def hub_scores(neighbours: Neighbours, k: int) -> np.ndarray:
    """(M,) r_m: the mean of row m's ``k`` largest similarities to other client-experts (itself
    left out; fewer when the row holds fewer; 0 for a row with none)."""
    indptr = neighbours.indptr
    rows = np.repeat(np.arange(neighbours.num_rows), np.diff(indptr))
    other = neighbours.indices != rows
    ptr = np.zeros(neighbours.num_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows[other], minlength=neighbours.num_rows), out=ptr[1:])
    vals = neighbours.values[other].astype(np.float64)  # rows stay sorted, decreasing
    rank = np.arange(vals.size) - ptr[:-1][rows[other]]
    top = rank < k
    total = np.bincount(rows[other][top], weights=vals[top], minlength=neighbours.num_rows)
    count = np.bincount(rows[other][top], minlength=neighbours.num_rows)
    return np.divide(total, count, out=np.zeros_like(total), where=count > 0)


def csls(neighbours: Neighbours, k: int) -> Neighbours:
    """``neighbours`` with every similarity replaced by its CSLS score / 2, each row sorted again
    (decreasing score, ties by column); ``k = 0`` returns them unchanged (the paper)."""
    if k < 0:
        raise ParamError("csls", k, "must be >= 0")
    if k == 0:
        return neighbours
    from fedmoe.affinity.topk import Neighbours

    r = hub_scores(neighbours, k)
    indptr, cols = neighbours.indptr, neighbours.indices
    rows = np.repeat(np.arange(neighbours.num_rows), np.diff(indptr))
    score = neighbours.values.astype(np.float64) - 0.5 * (r[rows] + r[cols])
    order = np.lexsort((cols, -score, rows))
    plain = None if neighbours.plain is None else neighbours.plain[order]
    return Neighbours(indptr, cols[order], score[order].astype(np.float32), neighbours.k, plain)
