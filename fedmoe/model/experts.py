"""The experts θ_1..θ_E, stacked as tensors with a leading expert dimension, and sparse dispatch.

Each expert is a two-layer MLP ``y = W2ᵀ relu(W1ᵀ x + b1) + b2``; parameters are stored as
``w1 (E, H, F)``, ``b1 (E, F)``, ``w2 (E, F, O)``, ``b2 (E, O)`` so that expert j is the slice
``[j]`` of every tensor (the unit that FedMoE-DA, arXiv 2411.02115, Eq. 11 aggregates).

Dispatch is sparse and grouped: the B·k (sample, expert) assignments are sorted by expert, the
inputs gathered into one contiguous block per expert, and each expert runs once on its block. The
per-expert work lives in one autograd function whose backward produces every weight gradient as
one ``(E, ...)`` tensor (the naive ``unbind``-and-stack autograd path spends most of its time
copying gradients: measured 65 % of a step) with one grouped GEMM call per product, so small
experts do not pay Python's per-call overhead E times (a quickstart client's round: −22 %, the
same bits).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from torch import nn


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """One GEMM per group in a single call: ``a`` (T, K) rows (or, for a 2-D ``b``, ``a`` (M, T)
    columns) split at ``offs``. ``torch._grouped_mm`` runs the same ``mm`` per group in C++ (bit
    for bit the Python loop, without its per-call overhead, which dominates small experts); torch
    versions without it use the loop."""
    if _HAS_GROUPED_MM and _aligned(a) and _aligned(b):
        return torch._grouped_mm(a, b, offs=offs)
    ends = offs.tolist()
    sizes = [t - s for s, t in itertools.pairwise([0, *ends])]
    # the groups' views are made by one split (or unbind) call each, not sliced one by one
    if b.dim() == 3:  # (T, K) @ (E, K, N) -> (T, N)
        out = a.new_empty(a.shape[0], b.shape[2])
        for x, w, o in zip(a.split(sizes), b.unbind(0), out.split(sizes), strict=True):
            torch.mm(x, w, out=o)
        return out
    out = a.new_empty(len(sizes), a.shape[0], b.shape[1])  # (M, T) @ (T, N) -> (E, M, N)
    for x, y, o in zip(a.split(sizes, dim=1), b.split(sizes), out.unbind(0), strict=True):
        torch.mm(x, y, out=o)
    return out


_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


def _aligned(t: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` takes ``t``: float32, 16-byte aligned data and strides."""
    per = 16 // t.element_size()
    return (
        t.dtype == torch.float32
        and t.data_ptr() % 16 == 0
        and all(s == 1 or s % per == 0 for s in t.stride())
    )


class _GroupedMLP(torch.autograd.Function):
    """Run expert e on rows ``[offset_e, offset_e + counts[e])`` of the expert-sorted input."""

    @staticmethod
    def forward(
        ctx: Any,
        xs: torch.Tensor,  # (T, H) inputs sorted by expert
        counts: list[int],  # (E,) rows per expert
        w1: torch.Tensor,  # (E, H, F)
        b1: torch.Tensor,  # (E, F)
        w2: torch.Tensor,  # (E, F, O)
        b2: torch.Tensor,  # (E, O)
    ) -> torch.Tensor:
        rows = xs.shape[0]
        h = xs.new_empty(rows, w1.shape[2])  # (T, F) post-activation
        y = xs.new_empty(rows, w2.shape[2])  # (T, O)
        parts = zip(
            counts, xs.split(counts), h.split(counts), y.split(counts),
            w1.unbind(0), b1.unbind(0), w2.unbind(0), b2.unbind(0), strict=True,
        )  # fmt: skip
        for c, x_e, h_e, y_e, w1_e, b1_e, w2_e, b2_e in parts:
            if c == 0:
                continue
            torch.addmm(b1_e, x_e, w1_e, out=h_e)  # (c, F)
            h_e.clamp_(min=0)
            torch.addmm(b2_e, h_e, w2_e, out=y_e)  # (c, O)
        ctx.save_for_backward(xs, h, w1, w2)
        ctx.counts = counts
        return y

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xs, h, w1, w2 = ctx.saved_tensors
        counts: list[int] = ctx.counts
        offs = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32)  # (E,) group ends
        gy = gy.contiguous()  # (T, O)
        dw2 = _grouped_mm(h.t(), gy, offs)  # (E, F, O)
        dh = _grouped_mm(gy, w2.transpose(1, 2), offs)  # (T, F)
        torch.ops.aten.threshold_backward.grad_input(dh, h, 0.0, grad_input=dh)  # relu'
        dw1 = _grouped_mm(xs.t(), dh, offs)  # (E, H, F)
        dx = _grouped_mm(dh, w1.transpose(1, 2), offs)  # (T, H)
        db1 = w1.new_zeros(w1.shape[0], w1.shape[2])  # (E, F)
        db2 = w2.new_zeros(w2.shape[0], w2.shape[2])  # (E, O)
        grads = zip(
            counts, gy.split(counts), dh.split(counts), db2.unbind(0), db1.unbind(0), strict=True
        )
        for c, gy_e, dh_e, db2_e, db1_e in grads:
            if c:
                torch.sum(gy_e, 0, out=db2_e)  # (O,)
                torch.sum(dh_e, 0, out=db1_e)  # (F,)
        return dx, None, dw1, db1, dw2, db2


class Experts(nn.Module):
    """E two-layer MLP experts with stacked parameters and grouped sparse dispatch."""

    def __init__(self, num_experts: int, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, in_dim, hidden))  # (E, H, F)
        self.b1 = nn.Parameter(torch.empty(num_experts, hidden))  # (E, F)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, out_dim))  # (E, F, O)
        self.b2 = nn.Parameter(torch.empty(num_experts, out_dim))  # (E, O)
        self.reset_parameters()

    @property
    def num_experts(self) -> int:
        """E."""
        return int(self.w1.shape[0])

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """PyTorch's Linear initialisation per expert: U(±1/√fan_in) for weights and biases."""
        for w, b in ((self.w1, self.b1), (self.w2, self.b2)):
            bound = 1.0 / math.sqrt(w.shape[1])
            with torch.no_grad():
                w.uniform_(-bound, bound, generator=generator)
                b.uniform_(-bound, bound, generator=generator)

    def forward(
        self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor
    ) -> torch.Tensor:
        """Sparse grouped dispatch: only the k chosen experts run for each sample.

        Parameters
        ----------
        x
            (B, H) inputs.
        weights, experts
            (B, k) combine weights and expert ids from the router.

        Returns
        -------
        torch.Tensor
            (B, O) the weighted sum of the chosen experts' outputs.
        """
        batch, k = experts.shape
        flat = experts.reshape(-1)  # (B·k,)
        order = torch.argsort(flat, stable=True)  # (B·k,) assignments sorted by expert
        token = order // k  # (B·k,) sample of each sorted assignment
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()  # (E,)
        xs = x.index_select(0, token)  # (B·k, H)
        params: tuple[torch.Tensor, ...] = (self.w1, self.b1, self.w2, self.b2)
        if torch.is_autocast_enabled("cpu"):  # the products in the autocast dtype (bf16)
            low = torch.get_autocast_dtype("cpu")
            xs, params = xs.to(low), tuple(p.to(low) for p in params)
        with torch.autocast("cpu", enabled=False):
            ys = _GroupedMLP.apply(xs, counts, *params).to(weights.dtype)  # (B·k, O)
            ys = ys * weights.reshape(-1)[order].unsqueeze(1)  # (B·k, O) combined in fp32
            return ys.new_zeros(batch, ys.shape[1]).index_add_(0, token, ys)  # (B, O)

    def forward_dense(
        self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor
    ) -> torch.Tensor:
        """Reference: run every expert on every sample and mask (E/k times the work; for tests)."""
        h = torch.relu(torch.einsum("bh,ehf->ebf", x, self.w1) + self.b1[:, None])  # (E, B, F)
        y = torch.einsum("ebf,efo->ebo", h, self.w2) + self.b2[:, None]  # (E, B, O)
        gate = x.new_zeros(x.shape[0], self.num_experts).scatter(1, experts, weights)  # (B, E)
        return torch.einsum("ebo,be->bo", y, gate)  # (B, O)
