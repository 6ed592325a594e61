"""A Little Is Enough (Baruch, Baruch & Goldberg, NeurIPS 2019): colluding clients send, per
coordinate, μ − z·σ of the benign participants' models, a shift small enough to pass
distance-based filters. z defaults to the paper's z_max for n participants of which f attack:
s = ⌊n/2 + 1⌋ − f, z = Φ⁻¹((n − s)/n).

Departure: the paper shifts gradients; we shift the trained parameters (the update of one round
of local training, which is what a client sends here). σ is the population standard deviation."""

from __future__ import annotations

import math
from statistics import NormalDist

import torch

from fedmoe.attack.base import AttackContext


def z_max(n: int, f: int) -> float:
    """Baruch et al.'s largest undetectable shift for n participants with f attackers."""
    s = math.floor(n / 2 + 1) - f
    p = (n - s) / n
    p = min(max(p, 1e-6), 1 - 1e-6)
    return NormalDist().inv_cdf(p)


def poison(ctx: AttackContext) -> dict[str, torch.Tensor]:
    """The shifted model (the honest one when no benign participant trained this round)."""
    if not ctx.benign:
        return dict(ctx.trained)
    z = ctx.scale if ctx.scale is not None else z_max(ctx.participants, ctx.attackers)
    out = {}
    for n, t in ctx.trained.items():
        stack = torch.stack([b[n].to(torch.float64) for b in ctx.benign])
        mu = stack.mean(dim=0)
        sd = stack.std(dim=0, correction=0)
        out[n] = (mu - z * sd).to(t.dtype)
    return out
