"""Update scaling, or boosting (Bhagoji et al., "Analyzing Federated Learning through an
Adversarial Lens", ICML 2019; Bagdasaryan et al.'s model replacement, AISTATS 2020): the client
sends θ0 + λ·Δ, every tensor, so that its update outweighs the others' in an average."""

from __future__ import annotations

import torch

from fedmoe.attack.base import AttackContext

DEFAULT_SCALE = 10.0


def poison(ctx: AttackContext) -> dict[str, torch.Tensor]:
    """The boosted model."""
    lam = ctx.scale if ctx.scale is not None else DEFAULT_SCALE
    return {n: ctx.start[n] + lam * ctx.update(n) for n in ctx.trained}
