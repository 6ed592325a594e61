"""The MoE classifier of FedMoE-DA (arXiv 2411.02115, Sec. III): embedding φ → gate G (top-k) →
experts θ, whose class logits are combined with the gate weights.

With ``moe_layers`` L > 1 (our extension: real MoE models stack many MoE layers), L − 1 hidden MoE
blocks sit between the embedding and the classifying MoE layer; block l computes
``h ← LayerNorm(h + Σ_k g_k · expert_k(h))`` with its own gate and E experts mapping H → H.

Tensor names (the checkpoint format, declared in :data:`fedmoe.model.schema.FEDMOE_LAYOUT`):
``embed.*`` (φ); ``blocks.{l}.gate.weight`` and ``blocks.{l}.experts.*`` (hidden MoE layer l);
``gate.weight`` (and ``gate.bias``) (G) and ``experts.w1 / b1 / w2 / b2`` (θ, leading dimension
E) of the classifying layer, which is MoE layer L − 1.
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
class Route:
    """How one MoE layer routed a batch."""

    probs: torch.Tensor  # (B, E) fp32 router probabilities
    weights: torch.Tensor  # (B, k) combine weights of the chosen experts
    experts: torch.Tensor  # (B, k) chosen expert ids


@dataclass(frozen=True)
class MoEOutput:
    """What one forward pass returns."""

    logits: torch.Tensor  # (B, C) class logits
    routes: tuple[Route, ...]  # one per MoE layer, in order (the classifying layer last)

    @property
    def probs(self) -> torch.Tensor:
        """(B, E) router probabilities of the classifying (last) MoE layer."""
        return self.routes[-1].probs

    @property
    def weights(self) -> torch.Tensor:
        """(B, k) combine weights of the classifying (last) MoE layer."""
        return self.routes[-1].weights

    @property
    def experts(self) -> torch.Tensor:
        """(B, k) expert ids chosen by the classifying (last) MoE layer."""
        return self.routes[-1].experts

    def balance_loss(self) -> torch.Tensor:
        """Switch-Transformer load-balancing loss, averaged over the MoE layers."""
        losses = [load_balance_loss(r.probs, r.experts, r.probs.shape[1]) for r in self.routes]
        return losses[0] if len(losses) == 1 else torch.stack(losses).mean()


class MoEBlock(nn.Module):
    """A hidden MoE layer: ``h ← LayerNorm(h + Σ_k g_k · expert_k(h))``, experts H → F → H."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.gate = Router(cfg.embed_dim, cfg.num_experts, cfg.top_k, cfg.gate_bias)
        self.experts = Experts(cfg.num_experts, cfg.embed_dim, cfg.expert_hidden, cfg.embed_dim)

    def forward(self, h: torch.Tensor, dense: bool = False) -> tuple[torch.Tensor, Route]:
        """(B, H) → (B, H) and the layer's routing."""
        probs, weights, experts = self.gate(h)  # (B, E), (B, k), (B, k)
        run = self.experts.forward_dense if dense else self.experts
        out = h + run(h, weights, experts)  # (B, H)
        return nn.functional.layer_norm(out, (out.shape[1],)), Route(probs, weights, experts)


class MoEClassifier(nn.Module):
    """Embedding, L − 1 hidden MoE blocks, then the classifying gate and stacked experts; only the
    top-k experts of each layer run per sample."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = make_embed(cfg)
        if cfg.moe_layers > 1:
            self.blocks = nn.ModuleList(MoEBlock(cfg) for _ in range(cfg.moe_layers - 1))
        self.gate = Router(cfg.embed_dim, cfg.num_experts, cfg.top_k, cfg.gate_bias)
        self.experts = Experts(cfg.num_experts, cfg.embed_dim, cfg.expert_hidden, cfg.num_classes)

    def hidden(self, x: torch.Tensor, dense: bool = False) -> tuple[torch.Tensor, list[Route]]:
        """The embedding and the hidden MoE blocks: (B, H) features and their routes."""
        h = self.embed(x)  # (B, H)
        routes: list[Route] = []
        for block in getattr(self, "blocks", ()):
            h, route = block(h, dense)
            routes.append(route)
        return h, routes

    def forward(self, x: torch.Tensor, dense: bool = False) -> MoEOutput:
        """Classify ``x`` (B, *input_shape); ``dense`` runs the all-experts masked reference."""
        h, routes = self.hidden(x, dense)  # (B, H)
        probs, weights, experts = self.gate(h)  # (B, E), (B, k), (B, k)
        run = self.experts.forward_dense if dense else self.experts
        logits = run(h, weights, experts)  # (B, C)
        return MoEOutput(logits, (*routes, Route(probs, weights, experts)))

    def routers(self) -> list[Router]:
        """The gate of every MoE layer, in layer order."""
        return [*(b.gate for b in getattr(self, "blocks", ())), self.gate]

    def expert_modules(self) -> list[Experts]:
        """The experts of every MoE layer, in layer order."""
        return [*(b.experts for b in getattr(self, "blocks", ())), self.experts]


def init_model(cfg: MoEConfig, seed: int) -> MoEClassifier:
    """A freshly initialised model; all randomness from one ``torch.Generator`` (global RNG unused).

    Linear and convolution layers use U(±1/√fan_in) (PyTorch's default bounds), the gate
    N(0, 1/H), experts per-expert U(±1/√fan_in).
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # built on the CPU, its throw-away values overwritten
        model = MoEClassifier(cfg)  # (not on the meta device: its to_empty imports sympy, ~1 s)
    with torch.no_grad():
        for module in model.embed.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                fan_in = module.weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in)
                module.weight.uniform_(-bound, bound, generator=generator)
                if module.bias is not None:
                    module.bias.uniform_(-bound, bound, generator=generator)
        for block in getattr(model, "blocks", ()):  # hidden MoE layers, in order
            block.gate.weight.normal_(0.0, cfg.embed_dim**-0.5, generator=generator)
            if block.gate.bias is not None:
                block.gate.bias.zero_()
            block.experts.reset_parameters(generator)
        model.gate.weight.normal_(0.0, cfg.embed_dim**-0.5, generator=generator)
        if model.gate.bias is not None:
            model.gate.bias.zero_()
        model.experts.reset_parameters(generator)
    return model


def build_model(cfg: MoEConfig, state: dict[str, torch.Tensor]) -> MoEClassifier:
    """A model holding ``state`` (tensors are copied; ``state`` is not modified). Built on the CPU
    (4× faster than on the meta device, whose dispatch dominates for small models) with the
    global random state saved and restored around the throw-away initialisation."""
    with torch.random.fork_rng(devices=[]):
        model = MoEClassifier(cfg)
    model.load_state_dict(state, strict=True)
    return model


def holding(
    model: MoEClassifier | None, cfg: MoEConfig, state: dict[str, torch.Tensor]
) -> MoEClassifier:
    """A module of ``cfg`` holding ``state``: ``model`` with ``state`` loaded into it (its
    tensors overwritten), or a new one when it is None. Loading costs a copy of the tensors,
    building a module ~2 ms of initialisation: a loop over many clients' models reuses one."""
    if model is None:
        return build_model(cfg, state)
    model.load_state_dict(state, strict=True)
    return model


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached, contiguous copies of a model's tensors, by name."""
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
