"""Exact blocked top-k cosine similarity with ties (FedMoE-DA, arXiv 2411.02115, Eq. 8–9).

For M proxies the full M×M similarity matrix does not fit at M = 64k (16 GiB), and the sparse
aggregation matrix only needs each row's largest entries. Rows are processed in blocks of ``B``:
one GEMM fills a reused (B, M) buffer; the row's columns are cut into chunks of ``c``, the maximum
of each chunk taken, and only the k chunks with the largest maxima are searched. This is exact:
every one of the row's k largest entries lies in a chunk whose maximum is at least the k-th value,
and at most k chunks qualify unless there are ties, which are detected (the (k+1)-th chunk maximum
reaches the threshold, or more than k candidates do) and resolved by scanning that row in full.
Memory is B·M floats plus the candidates, independent of M².

Conventions that make the result well defined: rows are L2-normalised in float32; a proxy's
similarity with itself is exactly 1; values within 4 float32 ulps of 1, or above it (a GEMM gives
identical directions as 0.99999994 or 1.0000001 depending on blocking), count as exactly 1; the result keeps, for each row, every entry ≥ its k-th largest value (ties kept), ordered by
decreasing similarity then increasing column.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedmoe.errors import InputError

BLOCK_BYTES = 128 << 20  # the similarity block's budget
NEAR_ONE = 1.0 - 4 * 2.0**-24  # within 4 float32 ulps of 1: identical directions, counted as 1


def snap(values: torch.Tensor) -> torch.Tensor:
    """Similarities within 4 ulps of 1 (or above, from rounding) become exactly 1."""
    return torch.where(values >= NEAR_ONE, torch.ones_like(values), values)


def _threshold(kth: torch.Tensor) -> torch.Tensor:
    """The raw similarity an entry must reach to be kept, given each row's k-th largest."""
    return torch.where(kth >= NEAR_ONE, torch.full_like(kth, NEAR_ONE), kth)


@dataclass(frozen=True)
class Neighbours:
    """Each row's largest similarities, in CSR form."""

    indptr: torch.Tensor  # (M + 1,) int64: row m's entries are [indptr[m], indptr[m + 1])
    indices: torch.Tensor  # (nnz,) int64 column of each entry
    values: torch.Tensor  # (nnz,) float32 cosine similarity of each entry
    k: int  # entries requested per row (rows hold more when ties reach the k-th value)

    @property
    def num_rows(self) -> int:
        """M."""
        return int(self.indptr.shape[0] - 1)

    def row(self, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(columns, values) of row ``m``."""
        lo, hi = int(self.indptr[m]), int(self.indptr[m + 1])
        return self.indices[lo:hi], self.values[lo:hi]


def normalise(proxies: torch.Tensor) -> torch.Tensor:
    """Float32 rows of unit L2 norm; an all-zero row is refused (its cosine is undefined)."""
    p = proxies.detach().to(torch.float32)  # (M, d)
    norms = p.norm(dim=1)  # (M,)
    zero = torch.nonzero(norms == 0).flatten()
    if zero.numel():
        raise InputError(
            f"proxy row {int(zero[0])} is all zeros; its cosine similarity is undefined"
        )
    return (p / norms[:, None]).contiguous()


def _order(cols: torch.Tensor, vals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row by decreasing value, then increasing column (deterministic tie order)."""
    cols, perm = torch.sort(cols, dim=-1, stable=True)  # by column
    vals = vals.gather(-1, perm)
    vals, perm = torch.sort(vals, dim=-1, descending=True, stable=True)  # then by value
    return cols.gather(-1, perm), vals


def topk_cosine(
    proxies: torch.Tensor, k: int, block_rows: int | None = None, chunk: int = 64
) -> Neighbours:
    """Each row's ``k`` most similar rows (itself included) by cosine similarity, ties kept.

    Parameters
    ----------
    proxies
        (M, d) proxy vectors (gate rows of every client-expert).
    k
        Entries per row (clipped to M).
    block_rows, chunk
        Rows per GEMM block (default: up to 512, keeping the block under 128 MiB) and columns per
        chunk; they change speed and memory, not the result.

    Returns
    -------
    Neighbours
    """
    u = normalise(proxies)  # (M, d)
    num = u.shape[0]
    if block_rows is None:
        block_rows = max(16, min(512, BLOCK_BYTES // (4 * max(num, 1))))
    k = max(1, min(k, num))
    full = (num // chunk) * chunk  # columns covered by whole chunks
    nch = full // chunk
    chunked = nch > k  # otherwise searching every column is as cheap
    buf = torch.empty(min(block_rows, num), num)  # (B, M) reused similarity block
    counts: list[torch.Tensor] = []
    all_cols: list[torch.Tensor] = []
    all_vals: list[torch.Tensor] = []
    for r0 in range(0, num, block_rows):
        r1 = min(r0 + block_rows, num)
        b = r1 - r0
        sim = buf[:b]
        torch.mm(u[r0:r1], u.T, out=sim)  # (b, M)
        rows = torch.arange(b)
        sim[rows, rows + r0] = 1.0  # a proxy is exactly as similar to itself as can be
        if chunked:
            cmax = sim[:, :full].view(b, nch, chunk).amax(dim=2)  # (b, nch)
            top_c, top_ci = cmax.topk(k + 1, dim=1)  # (b, k+1)
            offs = torch.arange(chunk)
            cand = (top_ci[:, :k, None] * chunk + offs).reshape(b, k * chunk)  # (b, k·c)
            if full < num:
                tail = torch.arange(full, num).expand(b, num - full)
                cand = torch.cat([cand, tail], dim=1)
            cvals = sim.gather(1, cand)  # (b, k·c + tail)
        else:
            cand = torch.arange(num).expand(b, num)
            cvals = sim
        vals, pos = cvals.topk(k, dim=1)  # (b, k)
        thr = _threshold(vals[:, -1])  # (b,) raw similarity an entry must reach
        over = (cvals >= thr[:, None]).sum(dim=1) > k  # ties inside the candidates
        if chunked:
            over |= top_c[:, k] >= thr  # a qualifying chunk was not searched
        cols, vals = _order(cand.gather(1, pos), snap(vals))  # (b, k)
        if bool(over.any()):  # rare: ties reach the k-th value; rescan those rows in full
            tie_rows = set(torch.nonzero(over).flatten().tolist())
            pieces_c, pieces_v, lens = [], [], []
            for i in range(b):
                if i in tie_rows:
                    c = torch.nonzero(sim[i] >= thr[i]).flatten()
                    rc, rv = _order(c, snap(sim[i, c]))
                else:
                    rc, rv = cols[i], vals[i]
                pieces_c.append(rc)
                pieces_v.append(rv)
                lens.append(rc.numel())
            all_cols.append(torch.cat(pieces_c))
            all_vals.append(torch.cat(pieces_v))
            counts.append(torch.tensor(lens, dtype=torch.int64))
        else:
            all_cols.append(cols.reshape(-1))
            all_vals.append(vals.reshape(-1))
            counts.append(torch.full((b,), k, dtype=torch.int64))
    indptr = torch.zeros(num + 1, dtype=torch.int64)
    torch.cumsum(torch.cat(counts), dim=0, out=indptr[1:])
    return Neighbours(indptr, torch.cat(all_cols), torch.cat(all_vals), k)


def topk_cosine_reference(proxies: torch.Tensor, k: int) -> Neighbours:
    """The same result from the full M×M matrix (for tests and small M only)."""
    u = normalise(proxies)
    num = u.shape[0]
    k = max(1, min(k, num))
    sim = u @ u.T  # (M, M)
    sim.fill_diagonal_(1.0)
    sim = snap(sim)
    cols, vals, counts = [], [], []
    for i in range(num):
        thr = torch.sort(sim[i], descending=True).values[k - 1]
        c = torch.nonzero(sim[i] >= thr).flatten()
        rc, rv = _order(c, sim[i, c])
        cols.append(rc)
        vals.append(rv)
        counts.append(c.numel())
    indptr = torch.zeros(num + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(torch.tensor(counts), dim=0)
    return Neighbours(indptr, torch.cat(cols), torch.cat(vals), k)
