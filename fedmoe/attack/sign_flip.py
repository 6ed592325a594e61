"""Sign flipping (the "bit-flipping" attack of Karimireddy, He & Jaggi, ICML 2021; with a factor,
Allen-Zhu et al., ICLR 2021): the client sends θ0 − λ·Δ instead of θ0 + Δ, every tensor."""

from __future__ import annotations

import torch

from fedmoe.attack.base import AttackContext

DEFAULT_SCALE = 1.0


def poison(ctx: AttackContext) -> dict[str, torch.Tensor]:
    """The flipped model."""
    lam = ctx.scale if ctx.scale is not None else DEFAULT_SCALE
    return {n: ctx.start[n] - lam * ctx.update(n) for n in ctx.trained}
