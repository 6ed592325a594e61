"""Centred expert proxies (beyond the paper): compare expert j of every client by how its gate row
*departs* from the typical expert j, not by the row itself.

Why. Every client starts from the same initial model, so client i's gate row j is mostly the
initial row j plus a small domain-specific move. The plain cosine of Eq. 8–9 (FedMoE-DA, arXiv
2411.02115) is then dominated by the shared part: each target's most similar other-client experts
are the same expert index of other clients (measured on the quickstart: 100 % of the top 4), and
the centre of those rows is the most similar row of all. An attacker who uploads the centre — ALIE
(Baruch et al., NeurIPS 2019) sends the benign mean minus a small shift — becomes every target's
nearest source (measured: 62–67 % of the top-4 sources of benign targets went to the 4 of 20
ALIE clients, over three seeds). Centring is the classic cure for such hubs (Suzuki, Hara,
Shimbo, Saerens & Fukumizu, "Centering Similarity Measures to Reduce Hubs", EMNLP 2013): after
subtracting the centre, a row at the centre is orthogonal to everyone.

What. For each expert index j, the rows of the N clients are centred on their coordinate-wise
median (not the mean, which a minority of far-off uploads could drag), and each row's neighbours
are the same expert of the other clients, ranked by the cosine of the centred rows. Measured on
the same uploads: ALIE clients' share of the top 4 fell to 0–3 %, and the share of honest
same-domain sources rose (clean: 0.46 → 0.52, 0.38 → 0.38, 0.37 → 0.39 on three seeds).
The centred cosine only *chooses* the kept set of Eq. 9; Eq. 10 still weighs it by the plain
cosine (kept beside the score as :attr:`Neighbours.plain`), so τ keeps its meaning: centred
cosines of honest peers are far below a row's 1 with itself (0.3–0.5 against 1), and a softmax
over them at τ = 0.1 gives the target's own expert 99 % of the weight (measured: 3 points of
clean accuracy lost).

Departures: the paper compares every client-expert with every other; here expert j is compared
only with expert j of other clients. Centred rows of different indices are not comparable (each
index has its own centre), and merging experts of different indices averages networks that did not
grow from the same initial weights; with a shared initialisation the plain cosine picks the same
index anyway. A centred row that is exactly zero (a client at the median in every coordinate)
has cosine 1 with the other such rows of its index (they are identical) and 0 with every other row.
"""

from __future__ import annotations

import numpy as np

from fedmoe.affinity.proxies import ExpertIndex
from fedmoe.affinity.topk import Neighbours, as_float32, normalise, snap, topk_cosine


def centre_rows(rows: np.ndarray) -> np.ndarray:
    """(N, H) rows of one expert index minus their coordinate-wise median (float64 statistics),
    with one column appended that is 1 for a row that centres to exactly zero and 0 otherwise
    (so such rows are unit vectors orthogonal to every other row and identical to each other)."""
    x = rows.astype(np.float64)
    centred = x - np.median(x, axis=0, keepdims=True)
    zero = ~np.any(centred != 0.0, axis=1)
    out = np.empty((x.shape[0], x.shape[1] + 1), dtype=np.float32)
    out[:, :-1] = centred
    out[:, -1] = zero
    return out


def centred_neighbours(proxies: np.ndarray, index: ExpertIndex, k: int) -> Neighbours:
    """Each client-expert's ``k`` most similar client-experts of the same expert index (itself
    included), by the cosine of the rows centred per index (:func:`centre_rows`); numbered and
    ordered as :func:`fedmoe.affinity.topk.topk_cosine` numbers and orders its result (decreasing
    similarity, then increasing column; ties kept).

    Parameters
    ----------
    proxies
        (N·E, H) gate rows, client-expert m = position(client)·E + j.
    index
        The numbering.
    k
        Entries per row (clipped to N).
    """
    p = as_float32(proxies)
    n, e = len(index.clients), index.num_experts
    counts = np.zeros(n * e, dtype=np.int64)
    cols: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * (n * e)
    vals: list[np.ndarray] = [np.empty(0, dtype=np.float32)] * (n * e)
    plain: list[np.ndarray] = [np.empty(0, dtype=np.float32)] * (n * e)
    for j in range(e):
        unit = normalise(p[j::e])  # (N, H): the plain proxies, for Eq. 10's weights
        rows = centre_rows(p[j::e])  # (N, H + 1): expert j of every client
        nb = topk_cosine(rows, k, overwrite=True)  # columns are client positions
        for c in range(n):
            lo, hi = int(nb.indptr[c]), int(nb.indptr[c + 1])
            m = c * e + j
            cols[m] = nb.indices[lo:hi] * e + j  # monotone in c: the order is kept
            vals[m] = nb.values[lo:hi]
            plain[m] = snap(unit[nb.indices[lo:hi]] @ unit[c])
            counts[m] = hi - lo
    indptr = np.zeros(n * e + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return Neighbours(
        indptr,
        np.concatenate(cols),
        np.concatenate(vals),
        max(1, min(k, n)),
        np.concatenate(plain),
    )
