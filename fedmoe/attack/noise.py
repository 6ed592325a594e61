"""Gaussian noise (the "Gaussian attack" of the Byzantine-robust literature, e.g. Fang et al.,
USENIX Security 2020): the client sends θ0 + ε, ε ~ N(0, (σ·rms(θ))²) per tensor — a broken or
random update of the same scale as the weights (σ = 1 by default)."""

from __future__ import annotations

import torch

from fedmoe.attack.base import AttackContext, generator

DEFAULT_SCALE = 1.0


def poison(ctx: AttackContext) -> dict[str, torch.Tensor]:
    """The noisy model (deterministic in ``ctx.seed``)."""
    sigma = ctx.scale if ctx.scale is not None else DEFAULT_SCALE
    g = generator(ctx.seed)
    out = {}
    for n in sorted(ctx.trained):
        t = ctx.trained[n]
        rms = float(t.to(torch.float64).pow(2).mean().sqrt()) if t.numel() else 0.0
        noise = torch.randn(t.shape, generator=g, dtype=torch.float64) * (sigma * rms)
        out[n] = (ctx.start[n].to(torch.float64) + noise).to(t.dtype)
    return out
