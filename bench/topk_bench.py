"""The exact top-k kernel and the sparse matrix (Eq. 9–10) over random proxies (M client-experts,
d dimensions), in this process: time and peak extra memory against the GEMM floor 2·M²·d / (the
best fp32 GEMM rate measured in the same run: torch at 4096 × d × 4096, NumPy's BLAS at the
kernel's block shape), and, where installed, FAISS's exact inner-product search (IndexFlatIP) on
the same normalised vectors. ``bench/sync_bench.py`` times the commands around it."""

from __future__ import annotations

import numpy as np
import torch

from bench.common import (
    Row,
    matmul_flops,
    median_time,
    numpy_gemm_flops,
    peak_bytes,
    peak_in_subprocess,
    reset_peak,
    rss_bytes,
    skipped,
)
from fedmoe.affinity import ExpertIndex
from fedmoe.affinity.topk import normalise, topk_cosine
from fedmoe.plan import aggregation_matrix


def memory_probe(m: int, d: int, k: int) -> float | None:
    """Peak extra memory of one plan over fresh random proxies (the proxies are the input)."""
    proxies = torch.randn(m, d, generator=torch.Generator().manual_seed(m + d))
    if not reset_peak():
        return None
    base = rss_bytes()
    nb = topk_cosine(proxies, k)
    aggregation_matrix(nb, ExpertIndex(tuple(range(m // 8)), 8), k - 1, 0.1)
    return peak_bytes() - base


def run(quick: bool) -> list[Row]:
    cases = [(4096, 128)] if quick else [(16384, 128), (65536, 128), (16384, 512)]
    rows = []
    k = 9  # P = 8
    for m, d in cases:
        proxies = torch.randn(m, d, generator=torch.Generator().manual_seed(m + d))
        flops = max(matmul_flops(d), numpy_gemm_flops(m, d))
        floor = 2.0 * m * m * d / flops

        def plan(proxies: torch.Tensor = proxies, m: int = m) -> object:
            nb = topk_cosine(proxies, k)
            index = ExpertIndex(tuple(range(m // 8)), 8)
            return aggregation_matrix(nb, index, k - 1, 0.1)

        repeats = 3 if m <= 16384 else 1  # the 64k case takes ~8 s a run
        seconds = median_time(plan, repeats=repeats)
        extra = peak_in_subprocess("bench.topk_bench", "memory_probe", m, d, k)
        target = "≥ 0.85× floor" if d == 128 else ""
        rows.append(
            Row(
                f"kernel + matrix: exact top-{k}, Eq. 9-10 with P={k - 1}, M={m:,}, d={d}",
                seconds,
                floor,
                "s",
                floor / seconds,
                target,
                (floor / seconds >= 0.85) if target else None,
                f"reference: GEMM floor at {flops / 1e9:.0f} GFLOP/s (best of torch, NumPy)",
                {"peak_extra_bytes": extra},
            )
        )
        mem_target = "≤ 256 MiB" if m >= 65536 else ""
        rows.append(
            Row(
                f"kernel + matrix: peak extra memory, M={m:,}, d={d}",
                extra,
                float(m) * m * 4,
                "B",
                (extra / (m * m * 4)) if extra else None,
                mem_target,
                (extra is not None and extra <= 256 * 2**20) if mem_target else None,
                "reference: the full M×M float32 matrix",
            )
        )
        rows.append(_faiss(proxies, k, seconds, m, d))
    return rows


def _faiss(proxies: torch.Tensor, k: int, ours: float, m: int, d: int) -> Row:
    metric = f"peer: FAISS IndexFlatIP exact top-{k}, M={m:,}, d={d}"
    try:
        import faiss
    except ImportError:
        return skipped(metric, "faiss-cpu")
    u = np.ascontiguousarray(normalise(proxies), dtype=np.float32)  # the kernel's NumPy input
    index = faiss.IndexFlatIP(d)
    index.add(u)
    peer = median_time(lambda: index.search(u, k), repeats=3 if m <= 16384 else 1)
    return Row(
        metric, ours, peer, "s", peer / ours, note="ratio = FAISS time / ours (ours keeps ties)"
    )


__all__ = ["np", "run"]
