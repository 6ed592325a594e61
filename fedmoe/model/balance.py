"""The load-balancing loss of the Switch Transformer.

Fedus, Zoph & Shazeer, "Switch Transformers: Scaling to Trillion Parameter Models with Simple and
Efficient Sparsity", JMLR 2022, Eq. 4: ``L = E · Σ_e f_e · P_e`` where ``f_e`` is the fraction of
routing assignments that go to expert e and ``P_e`` the mean router probability of e. It is 1 for
perfectly uniform routing. With top-k routing, ``f_e`` counts all k assignments per sample and is
divided by k, so the minimum stays 1.
"""

from __future__ import annotations

import torch


def load_balance_loss(probs: torch.Tensor, experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch-Transformer auxiliary loss.

    Parameters
    ----------
    probs
        (B, E) router softmax probabilities.
    experts
        (B, k) chosen expert ids.
    num_experts
        E.
    """
    batch, k = experts.shape
    counts = torch.bincount(experts.reshape(-1), minlength=num_experts)  # (E,)
    fraction = counts.to(probs.dtype) / (batch * k)  # (E,) f_e, no gradient
    mean_prob = probs.mean(dim=0)  # (E,) P_e
    return num_experts * torch.sum(fraction * mean_prob)
