"""The gating network G: one linear map from the embedding to E logits, softmax in fp32, top-k.

Its weight, shape (E, H), is the proxy matrix of FedMoE-DA (arXiv 2411.02115, Eq. 8): row j says
which region of embedding space the gate sends to expert j.
"""

from __future__ import annotations

import torch
from torch import nn


class Router(nn.Module):
    """Linear gate with top-k routing.

    Top-k weights are renormalised over the chosen experts when k > 1 (as in Mixtral); with k = 1
    the raw softmax probability is kept (as in the Switch Transformer), so the gate still receives a
    gradient from the task loss.
    """

    def __init__(self, embed_dim: int, num_experts: int, top_k: int, bias: bool = False) -> None:
        super().__init__()
        self.top_k = top_k
        self.weight = nn.Parameter(torch.empty(num_experts, embed_dim))  # (E, H)
        self.bias = nn.Parameter(torch.zeros(num_experts)) if bias else None
        if not self.weight.is_meta:  # on the meta device torch's normal_ imports dynamo (~2.5 s)
            nn.init.normal_(self.weight, std=embed_dim**-0.5)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Route a batch.

        Returns
        -------
        probs, weights, experts
            (B, E) fp32 softmax probabilities, (B, k) combine weights, (B, k) expert ids.
        """
        logits = nn.functional.linear(h, self.weight, self.bias)  # (B, E)
        probs = logits.float().softmax(dim=-1)  # (B, E) in fp32
        weights, experts = probs.topk(self.top_k, dim=-1)  # (B, k), (B, k)
        if self.top_k > 1:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return probs, weights.to(h.dtype), experts
