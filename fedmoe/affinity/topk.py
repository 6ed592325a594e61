"""Exact blocked top-k cosine similarity with ties (FedMoE-DA, arXiv 2411.02115, Eq. 8–9).

For M proxies the full M×M similarity matrix does not fit at M = 64k (16 GiB), and the sparse
aggregation matrix only needs each row's largest entries. Rows are processed in blocks of ``B``:
one GEMM fills a reused (B, M) buffer; the row's columns are split into groups of ``c`` (group g
holds the columns g, g + G, g + 2G, … with G = M // c, so a group's maxima is one elementwise
maximum over c contiguous slabs: a pass at memory speed), and only the k groups with the largest
maxima are searched. This is exact: every one of the row's k largest entries lies in a group whose
maximum is at least the k-th value, and at most k groups qualify unless there are ties, which are
detected (the (k+1)-th group maximum reaches the threshold, or more than k candidates do) and
resolved by scanning that row in full. Memory is B·M floats plus the candidates, independent of M².

The kernel is NumPy (its BLAS runs the GEMM): the commands that use it, ``affinity`` and
``plan-sync``, then need no torch, which alone costs ~1.5 s and ~220 MB of resident memory to import.

Conventions that make the result well defined: rows are L2-normalised in float32; a proxy's
similarity with itself is exactly 1; values within 4 float32 ulps of 1, or above it (a GEMM gives
identical directions as 0.99999994 or 1.0000001 depending on blocking), count as exactly 1; the
result keeps, for each row, every entry ≥ its k-th largest value (ties kept), ordered by
decreasing similarity then increasing column.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedmoe.errors import InputError

BLOCK_BYTES = 64 << 20  # the similarity block's budget
NEAR_ONE = np.float32(1.0 - 4 * 2.0**-24)  # within 4 float32 ulps of 1: counted as 1
ONE = np.float32(1.0)


def snap(values: np.ndarray) -> np.ndarray:
    """Similarities within 4 ulps of 1 (or above, from rounding) become exactly 1."""
    return np.where(values >= NEAR_ONE, ONE, values).astype(np.float32, copy=False)


def _threshold(kth: np.ndarray) -> np.ndarray:
    """The raw similarity an entry must reach to be kept, given each row's k-th largest."""
    return np.minimum(kth, NEAR_ONE)


def as_float32(x: Any) -> np.ndarray:
    """A float32 NumPy array of ``x`` (a NumPy array or a CPU torch tensor of any float dtype)."""
    if hasattr(x, "detach"):  # a torch tensor: bfloat16 has no NumPy dtype, so convert in torch
        x = x.detach().float().numpy()
    return np.asarray(x, dtype=np.float32)


@dataclass(frozen=True)
class Neighbours:
    """Each row's largest similarities, in CSR form (NumPy arrays)."""

    indptr: np.ndarray  # (M + 1,) int64: row m's entries are [indptr[m], indptr[m + 1])
    indices: np.ndarray  # (nnz,) int64 column of each entry
    values: np.ndarray  # (nnz,) float32 cosine similarity of each entry (the ranking score)
    k: int  # entries requested per row (rows hold more when ties reach the k-th value)
    # (nnz,) float32 plain cosine of each entry when ``values`` rank by another score (centred
    # proxies); None when ``values`` are the plain cosines
    plain: np.ndarray | None = None

    @property
    def weight_values(self) -> np.ndarray:
        """The similarities Eq. 10's softmax weighs: ``plain`` when set, else ``values``."""
        return self.values if self.plain is None else self.plain

    def subset(self, indptr: np.ndarray, keep: np.ndarray) -> Neighbours:
        """The entries ``keep`` (a boolean mask or positions) under the new ``indptr``."""
        plain = None if self.plain is None else self.plain[keep]
        return Neighbours(indptr, self.indices[keep], self.values[keep], self.k, plain)

    @property
    def num_rows(self) -> int:
        """M."""
        return int(self.indptr.shape[0] - 1)

    def row(self, m: int) -> tuple[np.ndarray, np.ndarray]:
        """(columns, values) of row ``m``."""
        lo, hi = int(self.indptr[m]), int(self.indptr[m + 1])
        return self.indices[lo:hi], self.values[lo:hi]

    def same_as(self, other: Neighbours) -> bool:
        """Identical rows, columns and values."""
        return (
            self.k == other.k
            and np.array_equal(self.indptr, other.indptr)
            and np.array_equal(self.indices, other.indices)
            and np.array_equal(self.values, other.values)
            and _same_optional(self.plain, other.plain)
        )


def _same_optional(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    """Both absent, or both present and equal."""
    if a is None or b is None:
        return a is None and b is None
    return bool(np.array_equal(a, b))


def normalise(proxies: Any, overwrite: bool = False) -> np.ndarray:
    """Float32 rows of unit L2 norm; an all-zero row is refused (its cosine is undefined).
    ``overwrite``: a contiguous float32 NumPy input is normalised in place (no copy)."""
    p = as_float32(proxies)  # (M, d)
    norms = np.sqrt(np.einsum("ij,ij->i", p, p, dtype=np.float32))  # (M,)
    zero = np.flatnonzero(norms == 0)
    if zero.size:
        raise InputError(
            f"proxy row {int(zero[0])} is all zeros; its cosine similarity is undefined"
        )
    if overwrite and p is proxies and p.flags.c_contiguous and p.flags.writeable:
        np.divide(p, norms[:, None], out=p)
        return p
    return np.ascontiguousarray(p / norms[:, None], dtype=np.float32)


def _order(cols: np.ndarray, vals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by decreasing value, then increasing column (deterministic tie order)."""
    perm = np.argsort(cols, axis=-1, kind="stable")  # by column
    cols, vals = np.take_along_axis(cols, perm, -1), np.take_along_axis(vals, perm, -1)
    perm = np.argsort(-vals, axis=-1, kind="stable")  # then by value
    return np.take_along_axis(cols, perm, -1), np.take_along_axis(vals, perm, -1)


def _largest(values: np.ndarray, k: int) -> np.ndarray:
    """Positions of each row's ``k`` largest values (any order; ties broken arbitrarily)."""
    if k >= values.shape[1]:
        return np.broadcast_to(np.arange(values.shape[1]), values.shape)
    return np.argpartition(values, values.shape[1] - k, axis=1)[:, values.shape[1] - k :]


def topk_cosine(
    proxies: Any,
    k: int,
    block_rows: int | None = None,
    chunk: int = 32,
    workers: int | None = None,
    overwrite: bool = False,
) -> Neighbours:
    """Each row's ``k`` most similar rows (itself included) by cosine similarity, ties kept.

    Parameters
    ----------
    proxies
        (M, d) proxy vectors (gate rows of every client-expert): a NumPy array or a torch tensor.
    k
        Entries per row (clipped to M).
    block_rows, chunk
        Rows per GEMM block (default: up to 512, keeping the block under 64 MiB) and columns per
        group; they change speed and memory, not the result.
    workers
        Threads that search each block's rows (default: 2 where there are two cores and M ≥ 4096;
        the GEMM uses BLAS's own threads, never at the same time); the result does not change.
    overwrite
        Normalise a float32 NumPy ``proxies`` in place instead of copying it (for a caller that
        owns the array: at M = 65,536 and d = 128 the copy is 32 MiB).

    Returns
    -------
    Neighbours
    """
    u = normalise(proxies, overwrite)  # (M, d)
    num = u.shape[0]
    if block_rows is None:
        block_rows = max(16, min(512, BLOCK_BYTES // (4 * max(num, 1))))
    k = max(1, min(k, num))
    search = _Search(num, k, chunk)
    buf = np.empty((min(block_rows, num), num), dtype=np.float32)  # (B, M) reused block
    if workers is None:
        workers = min(2, os.cpu_count() or 1) if num >= 4096 else 1
    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    try:
        for r0 in range(0, num, block_rows):
            r1 = min(r0 + block_rows, num)
            b = r1 - r0
            sim = buf[:b]
            np.matmul(u[r0:r1], u.T, out=sim)  # (b, M): BLAS uses every core
            rows = np.arange(b)
            sim[rows, rows + r0] = ONE  # a proxy is exactly as similar to itself as can be
            if pool is None or b < 2 * workers:
                pieces.append(search.rows(sim))
            else:  # the search is memory-bound and single-threaded in NumPy: split the rows
                cut = np.linspace(0, b, workers + 1).astype(int)
                pieces.extend(
                    pool.map(search.rows, [sim[cut[i] : cut[i + 1]] for i in range(workers)])
                )
    finally:
        if pool is not None:
            pool.shutdown()
    indptr = np.zeros(num + 1, dtype=np.int64)
    np.cumsum(np.concatenate([p[2] for p in pieces]), out=indptr[1:])
    return Neighbours(
        indptr,
        np.concatenate([p[0] for p in pieces]).astype(np.int64, copy=False),
        np.concatenate([p[1] for p in pieces]).astype(np.float32, copy=False),
        k,
    )


class _Search:
    """The exact search of one block's rows for their k largest entries (see the module)."""

    def __init__(self, num: int, k: int, chunk: int) -> None:
        self.num, self.k, self.chunk = num, k, chunk
        self.groups = num // chunk  # G: group g holds the columns g + G·t, t < chunk
        self.full = self.groups * chunk  # columns in whole groups; the rest are always searched
        self.chunked = self.groups > k  # otherwise searching every column is as cheap
        self.offs = np.arange(chunk, dtype=np.int64) * self.groups  # (c,) a group's columns
        self.tail = np.arange(self.full, num, dtype=np.int64)

    def rows(self, sim: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(columns, values, counts) of the rows of ``sim`` (b, M), in CSR order."""
        b, k = sim.shape[0], self.k
        rows = np.arange(b)
        if self.chunked:
            gmax = np.max(sim[:, : self.full].reshape(b, self.chunk, self.groups), axis=1)
            top = _largest(gmax, k + 1)  # (b, k+1), unordered
            topv = np.take_along_axis(gmax, top, 1)
            least = np.argmin(topv, axis=1)  # the (k+1)-th largest group maximum
            next_max = topv[rows, least]  # (b,)
            keep = np.ones(top.shape, dtype=bool)
            keep[rows, least] = False
            searched = top[keep].reshape(b, k)  # (b, k) the k groups with the largest maxima
            cand = (searched[:, :, None] + self.offs).reshape(b, k * self.chunk)  # (b, k·c)
            if self.tail.size:
                cand = np.concatenate(
                    [cand, np.broadcast_to(self.tail, (b, self.tail.size))], axis=1
                )
            cvals = np.take_along_axis(sim, cand, 1)  # (b, k·c + tail)
        else:
            cand = np.broadcast_to(np.arange(self.num, dtype=np.int64), (b, self.num))
            cvals = sim
        pos = _largest(cvals, k)  # (b, k)
        vals = np.take_along_axis(cvals, pos, 1)
        thr = _threshold(vals.min(axis=1))  # (b,) raw similarity an entry must reach
        over = (cvals >= thr[:, None]).sum(axis=1) > k  # ties inside the candidates
        if self.chunked:
            over |= next_max >= thr  # a qualifying group was not searched
        cols, vals = _order(np.take_along_axis(cand, pos, 1), snap(vals))  # (b, k)
        lens = np.full(b, k, dtype=np.int64)
        if not over.any():
            return cols.reshape(-1), vals.reshape(-1), lens
        # rare: ties reach the k-th value; rescan those rows in full
        pieces_c, pieces_v = list(cols), list(vals)
        for i in np.flatnonzero(over):
            c = np.flatnonzero(sim[i] >= thr[i])
            pieces_c[i], pieces_v[i] = _order(c, snap(sim[i, c]))
            lens[i] = c.size
        return np.concatenate(pieces_c), np.concatenate(pieces_v), lens


def topk_cosine_reference(proxies: Any, k: int) -> Neighbours:
    """The same result from the full M×M matrix (for tests and small M only)."""
    u = normalise(proxies)
    num = u.shape[0]
    k = max(1, min(k, num))
    sim = u @ u.T  # (M, M)
    np.fill_diagonal(sim, ONE)
    sim = snap(sim)
    cols, vals, counts = [], [], []
    for i in range(num):
        thr = np.sort(sim[i])[::-1][k - 1]
        c = np.flatnonzero(sim[i] >= thr)
        rc, rv = _order(c, sim[i, c])
        cols.append(rc)
        vals.append(rv)
        counts.append(c.size)
    indptr = np.zeros(num + 1, dtype=np.int64)
    indptr[1:] = np.cumsum(counts)
    return Neighbours(indptr, np.concatenate(cols).astype(np.int64), np.concatenate(vals), k)
