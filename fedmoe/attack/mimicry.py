"""Proxy mimicry: an attack on FedMoE-DA's expert selection itself (our design; the method's
paper, arXiv 2411.02115, does not consider malicious peers).

The server links client-experts by the cosine similarity of their gate rows (Eq. 8–10). A
mimicking client copies the most *popular* benign gate rows — those with the highest mean cosine
to every other benign row this round — into its own gate, so that many targets rank its experts
among their most similar and fetch them, and poisons everything else it sends (its experts and
shared parts) with another attack (``poison``, default Gaussian noise). Several mimics spread over
different popular rows (attacker a, expert j copies the row of rank a + j·f)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fedmoe.attack.base import AttackContext


def popular_rows(benign: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The benign proxy rows (M_b, H) and their order by decreasing mean cosine to the others."""
    rows = torch.cat([b.to(torch.float64) for b in benign])  # (M_b, H)
    unit = rows / torch.clamp(rows.norm(dim=1, keepdim=True), min=1e-300)
    popularity = (unit @ unit.T).mean(dim=1)
    order = torch.argsort(-popularity, stable=True)
    return rows, order


def poison(
    ctx: AttackContext, other: Callable[[AttackContext], dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """The mimicking model: popular gate rows, everything else poisoned by ``other``."""
    out = other(ctx)
    if not ctx.benign:
        return out
    for layer in range(ctx.schema.num_layers):
        name = ctx.schema.proxy(layer)
        rows, order = popular_rows([b[name] for b in ctx.benign])
        own = ctx.trained[name]
        gate = own.clone()
        for j in range(own.shape[0]):
            pick = int(order[(ctx.rank + j * max(ctx.attackers, 1)) % len(order)])
            gate[j] = rows[pick].to(own.dtype)
        out[name] = gate
        for entry in ctx.schema.gates(layer):  # the rest of the gate (a bias) stays honest
            if entry.name != name:
                out[entry.name] = ctx.trained[entry.name]
    return out
