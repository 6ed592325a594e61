"""One local round of FedMoE-DA (arXiv 2411.02115, Sec. III-A, step 1): a client trains φ, G and
its experts for a few epochs on its own data, minimising cross-entropy plus the Switch-Transformer
load-balancing loss so that no expert starves.

Threads: one process trains clients one after the other with every core (two processes × two
threads make small matmuls ~50× slower on a 2-core machine). Adam uses the fused CPU kernel
(~3× faster per step than the default loop).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from fedmoe.model import MoEClassifier, MoEConfig, build_model, state_of
from fedmoe.train.config import Optimizer, Precision, TrainConfig


@dataclass(frozen=True)
class TrainResult:
    """The outcome of one local round."""

    state: dict[str, torch.Tensor]  # the trained tensors
    epoch_loss: tuple[float, ...]  # mean task loss per epoch
    epoch_balance: tuple[float, ...]  # mean load-balancing loss per epoch
    steps: int  # optimiser steps taken
    samples: int  # samples processed (epochs × train size)
    seconds: float  # wall time of the round


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The configured optimiser (fused Adam/AdamW on CPU)."""
    if cfg.optimizer is Optimizer.SGD:
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer is Optimizer.ADAMW else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


def train_local(
    config: MoEConfig,
    state: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    seed: int,
) -> TrainResult:
    """Train a copy of the model in ``state`` on ``(x, y)``; ``state`` itself is not modified.

    Parameters
    ----------
    config, state
        The model to start from.
    x, y
        (n, *input_shape) float32 samples and (n,) int64 labels of the client's train split.
    cfg
        Hyper-parameters.
    seed
        Seeds the mini-batch order (a ``torch.Generator``); same inputs and seed give the same
        tensors, bit for bit, at a fixed thread count.
    """
    return fit(build_model(config, state), x, y, cfg, seed)


def autocast(cfg: TrainConfig) -> torch.autocast:
    """The forward pass's arithmetic: with ``precision: bf16``, CPU autocast runs the matrix
    products in bfloat16 while parameters, gradients and the optimiser stay float32 (mixed
    precision, Micikevicius et al., ICLR 2018, with bfloat16's fp32 range needing no loss scale).
    """
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision is Precision.BF16)


def bf16_native() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (oneDNN with AVX512-BF16 or AMX);
    elsewhere torch's fallback runs them several times slower than float32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def proximal_term(
    params: list[nn.Parameter], anchors: list[torch.Tensor], mu: float
) -> torch.Tensor:
    """FedProx's proximal term mu/2 * ||w - w_start||^2 over every trained tensor (Li et al.,
    "Federated Optimization in Heterogeneous Networks", MLSys 2020, Eq. 2): it keeps a client's
    local optimum near the model it started the round from."""
    total = torch.zeros((), dtype=torch.float32)
    for p, a in zip(params, anchors, strict=True):
        total = total + (p - a).pow(2).sum()
    return 0.5 * mu * total


def epoch_batches(
    n: int, cfg: TrainConfig, generator: torch.Generator
) -> Iterator[list[torch.Tensor]]:  # fmt: skip
    """Each epoch's mini-batches of ``n`` samples: a permutation drawn from ``generator`` at the
    epoch's start, cut into ``batch_size`` pieces (the last one shorter)."""
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=generator)  # (n,)
        yield [order[first : first + cfg.batch_size] for first in range(0, n, cfg.batch_size)]


def fit(
    model: MoEClassifier, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, seed: int
) -> TrainResult:
    """Train ``model`` in place on ``(x, y)`` (see :func:`train_local`); returns its new state."""
    start = time.perf_counter()
    model.train()
    params = list(model.parameters())
    anchors = [p.detach().clone() for p in params] if cfg.prox_mu > 0 else None
    opt = make_optimizer(params, cfg)
    generator = torch.Generator().manual_seed(seed)
    n = int(y.shape[0])
    losses: list[float] = []
    balances: list[float] = []
    steps = 0
    for batches in epoch_batches(n, cfg, generator):
        total, total_bal = 0.0, 0.0
        for idx in batches:  # (b,) sample indices
            with autocast(cfg):
                out = model(x[idx])
                task = nn.functional.cross_entropy(out.logits.float(), y[idx])
                bal = out.balance_loss()
            loss = task + cfg.balance_coef * bal
            if anchors is not None:
                loss = loss + proximal_term(params, anchors, cfg.prox_mu)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            total += float(task.detach()) * idx.shape[0]
            total_bal += float(bal.detach()) * idx.shape[0]
        losses.append(total / max(n, 1))
        balances.append(total_bal / max(n, 1))
    return TrainResult(
        state=state_of(model),
        epoch_loss=tuple(losses),
        epoch_balance=tuple(balances),
        steps=steps,
        samples=n * cfg.epochs,
        seconds=time.perf_counter() - start,
    )
