"""The MoE classifier of FedMoE-DA (arXiv 2411.02115, Sec. III): embedding φ → gate G (top-k) →
experts θ, whose class logits are combined with the gate weights.

Tensor names (the checkpoint format): ``embed.*`` (φ), ``gate.weight`` (and ``gate.bias``) (G),
``experts.w1 / b1 / w2 / b2`` (θ, leading dimension E).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fedmoe.model.balance import load_balance_loss
from fedmoe.model.config import MoEConfig
from fedmoe.model.embed import make_embed
from fedmoe.model.experts import Experts
from fedmoe.model.router import Router


@dataclass(frozen=True)
class MoEOutput:
    """What one forward pass returns."""

    logits: torch.Tensor  # (B, C) class logits
    probs: torch.Tensor  # (B, E) fp32 router probabilities
    weights: torch.Tensor  # (B, k) combine weights of the chosen experts
    experts: torch.Tensor  # (B, k) chosen expert ids

    def balance_loss(self) -> torch.Tensor:
        """Switch-Transformer load-balancing loss of this batch's routing."""
        return load_balance_loss(self.probs, self.experts, self.probs.shape[1])


class MoEClassifier(nn.Module):
    """Embedding, gate and stacked experts; only the top-k experts run per sample."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = make_embed(cfg)
        self.gate = Router(cfg.embed_dim, cfg.num_experts, cfg.top_k, cfg.gate_bias)
        self.experts = Experts(cfg.num_experts, cfg.embed_dim, cfg.expert_hidden, cfg.num_classes)

    def forward(self, x: torch.Tensor, dense: bool = False) -> MoEOutput:
        """Classify ``x`` (B, *input_shape); ``dense`` runs the all-experts masked reference."""
        h = self.embed(x)  # (B, H)
        probs, weights, experts = self.gate(h)  # (B, E), (B, k), (B, k)
        run = self.experts.forward_dense if dense else self.experts
        logits = run(h, weights, experts)  # (B, C)
        return MoEOutput(logits, probs, weights, experts)


def init_model(cfg: MoEConfig, seed: int) -> MoEClassifier:
    """A freshly initialised model; all randomness from one ``torch.Generator`` (global RNG unused).

    Linear and convolution layers use U(±1/√fan_in) (PyTorch's default bounds), the gate
    N(0, 1/H), experts per-expert U(±1/√fan_in).
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = MoEClassifier(cfg)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for module in model.embed.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                fan_in = module.weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in)
                module.weight.uniform_(-bound, bound, generator=generator)
                if module.bias is not None:
                    module.bias.uniform_(-bound, bound, generator=generator)
        model.gate.weight.normal_(0.0, cfg.embed_dim**-0.5, generator=generator)
        if model.gate.bias is not None:
            model.gate.bias.zero_()
        model.experts.reset_parameters(generator)
    return model


def build_model(cfg: MoEConfig, state: dict[str, torch.Tensor]) -> MoEClassifier:
    """A model holding ``state`` (tensors are copied; ``state`` is not modified)."""
    with torch.device("meta"):
        model = MoEClassifier(cfg)
    model = model.to_empty(device="cpu")
    model.load_state_dict(state, strict=True)
    return model


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached, contiguous copies of a model's tensors, by name."""
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
