"""Simulated malicious clients for robustness studies (``attack:`` in a recipe): one attack per
file behind :class:`~fedmoe.attack.base.AttackContext`, and :func:`poison_upload` to apply one."""

from __future__ import annotations

import torch

from fedmoe.attack import alie, mimicry, noise, scaling, sign_flip
from fedmoe.attack.base import (
    AttackConfig,
    AttackContext,
    AttackKind,
    malicious_clients,
)

_SIMPLE = {
    AttackKind.SIGN_FLIP: sign_flip.poison,
    AttackKind.SCALING: scaling.poison,
    AttackKind.NOISE: noise.poison,
    AttackKind.ALIE: alie.poison,
}


def poison_upload(
    kind: AttackKind, ctx: AttackContext, poison: AttackKind = AttackKind.NOISE
) -> dict[str, torch.Tensor]:
    """The model a malicious client sends instead of its honest one (same names, shapes and
    dtypes)."""
    simple = _SIMPLE[poison if kind is AttackKind.MIMICRY else kind]
    out = mimicry.poison(ctx, simple) if kind is AttackKind.MIMICRY else simple(ctx)
    return {n: out[n].to(ctx.trained[n].dtype).contiguous() for n in ctx.trained}


__all__ = ["AttackConfig", "AttackContext", "AttackKind", "malicious_clients", "poison_upload"]
