"""Applying an attack to a malicious client's upload (:func:`poison_upload`)."""

from __future__ import annotations

import torch

from fedmoe.attack import alie, mimicry, noise, scaling, sign_flip
from fedmoe.attack.base import AttackContext, AttackKind, AttackParts
from fedmoe.model.schema import Role

_SIMPLE = {
    AttackKind.SIGN_FLIP: sign_flip.poison,
    AttackKind.SCALING: scaling.poison,
    AttackKind.NOISE: noise.poison,
    AttackKind.ALIE: alie.poison,
}


def poison_upload(
    kind: AttackKind,
    ctx: AttackContext,
    poison: AttackKind = AttackKind.NOISE,
    parts: AttackParts = AttackParts.ALL,
) -> dict[str, torch.Tensor]:
    """The model a malicious client sends instead of its honest one (same names, shapes and
    dtypes); with ``parts``, only the shared parts or only the experts are poisoned."""
    simple = _SIMPLE[poison if kind is AttackKind.MIMICRY else kind]
    out = mimicry.poison(ctx, simple) if kind is AttackKind.MIMICRY else simple(ctx)

    def poisoned(name: str) -> bool:
        role = ctx.schema.role(name)
        if parts is AttackParts.SHARED:
            return role is not Role.EXPERT
        if parts is AttackParts.EXPERTS:
            return role is Role.EXPERT or (kind is AttackKind.MIMICRY and role is Role.GATE)
        return True

    return {
        n: (out[n] if poisoned(n) else ctx.trained[n]).to(ctx.trained[n].dtype).contiguous()
        for n in ctx.trained
    }
