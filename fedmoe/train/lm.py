"""Local training and evaluation of a Hugging Face MoE causal language model on byte windows
(:mod:`fedmoe.data.text`): FedMoE-DA's client step (arXiv 2411.02115, Sec. III, step 1) for the
language models the method is meant for.

The loss is next-byte cross-entropy over every position of a window plus the router's
load-balancing loss as the model family defines it (``router_aux_loss_coef`` × the Switch loss
that ``transformers`` returns as ``aux_loss`` when ``output_router_logits`` is on);
``TrainConfig.balance_coef`` is not used here, the model's own coefficient is. The model is any module with the ``transformers`` causal-LM interface; nothing
here reads or writes a file.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fedmoe.model.hf import TrainParts
from fedmoe.train.config import Optimizer, TrainConfig
from fedmoe.train.local import autocast, proximal_term


@dataclass(frozen=True)
class LMResult:
    """What one client's local round produced."""

    epoch_loss: list[float]  # mean next-byte cross-entropy per epoch (nats)
    steps: int
    seconds: float
    samples: int


def _trainable(model: nn.Module, parts: TrainParts, is_expert: Any) -> list[nn.Parameter]:
    params = []
    for name, p in model.named_parameters():
        keep = parts is TrainParts.ALL or is_expert(name)
        p.requires_grad_(keep)
        if keep:
            params.append(p)
    return params


def _optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer is Optimizer.SGD:
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    kind = torch.optim.AdamW if cfg.optimizer is Optimizer.ADAMW else torch.optim.Adam
    try:
        return kind(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError):  # fused needs floating parameters on a supported device
        return kind(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def train_lm(
    model: nn.Module,
    tokens: np.ndarray,
    cfg: TrainConfig,
    seed: int,
    parts: TrainParts = TrainParts.ALL,
    is_expert: Any = None,
) -> LMResult:
    """Train ``model`` in place on ``tokens`` (n, L + 1) byte ids for ``cfg.epochs`` epochs.

    Parameters
    ----------
    is_expert
        Parameter name → True for the routed experts and routers (with ``parts=experts``).
    """
    generator = torch.Generator().manual_seed(seed)
    data = torch.from_numpy(tokens)
    params = _trainable(model, parts, is_expert or (lambda _n: True))
    opt = _optimizer(params, cfg)
    anchors = [p.detach().clone() for p in params] if cfg.prox_mu > 0 else None
    model.train()
    losses: list[float] = []
    steps, start, n = 0, time.perf_counter(), int(data.shape[0])
    coef = float(getattr(model.config, "router_aux_loss_coef", 0.0) or 0.0)
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=generator)
        total, count = 0.0, 0
        for first in range(0, n, cfg.batch_size):
            batch = data[order[first : first + cfg.batch_size]]
            with autocast(cfg):
                out = model(input_ids=batch[:, :-1], output_router_logits=True)
            nll = _next_byte_nll(out.logits.float(), batch)
            aux = getattr(out, "aux_loss", None)
            loss = nll if aux is None else nll + coef * aux
            if anchors is not None:
                loss = loss + proximal_term(params, anchors, cfg.prox_mu)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(nll.detach()) * batch.shape[0]
            count += batch.shape[0]
            steps += 1
        losses.append(total / max(count, 1))
    for p in model.parameters():
        p.requires_grad_(True)
    return LMResult(losses, steps, time.perf_counter() - start, n * cfg.epochs)


def _next_byte_nll(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of every next byte of the windows: logit t predicts byte t + 1."""
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1)
    )


@torch.no_grad()
def sample_nll(model: nn.Module, tokens: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Mean next-byte negative log-likelihood (nats per byte) of each window (n,)."""
    model.eval()
    data = torch.from_numpy(tokens)
    out = []
    for first in range(0, int(data.shape[0]), batch_size):
        batch = data[first : first + batch_size]
        logits = model(input_ids=batch[:, :-1]).logits.float()  # (b, L, V)
        nll = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
        )
        out.append(nll.reshape(batch.shape[0], -1).mean(dim=1).double().numpy())
    return np.concatenate(out) if out else np.empty(0)


def perplexity(nll: np.ndarray) -> float | None:
    """exp of the mean per-byte NLL (None for no sample)."""
    return round(math.exp(float(nll.mean())), 6) if nll.size else None


@torch.no_grad()
def lm_routing(
    model: nn.Module, tokens: np.ndarray, domains: np.ndarray, num_domains: int, top_k: int,
    batch_size: int = 64,
) -> dict[str, Any]:  # fmt: skip
    """Per MoE layer, each expert's top-k assignments over every byte position of ``tokens``:
    overall, by domain, and the mean router probability (the routing JSON of
    :mod:`fedmoe.train.routing`; ``by_label`` is empty, a language model has no labels)."""
    model.eval()
    data = torch.from_numpy(tokens)
    layers: list[dict[str, np.ndarray]] = []
    n = int(data.shape[0])
    positions = 0
    for first in range(0, n, batch_size):
        batch = data[first : first + batch_size]
        out = model(input_ids=batch[:, :-1], output_router_logits=True)
        seq = batch.shape[1] - 1
        dom = np.repeat(domains[first : first + batch_size], seq * top_k)  # (b·L·k,)
        positions += batch.shape[0] * seq
        for layer, logits in enumerate(out.router_logits):
            probs = logits.float().softmax(dim=-1)  # (b·L, E)
            e = probs.shape[-1]
            chosen = probs.topk(top_k, dim=-1).indices.reshape(-1).numpy()  # (b·L·k,)
            if len(layers) <= layer:
                layers.append(
                    {
                        "count": np.zeros(e, np.int64),
                        "prob": np.zeros(e, np.float64),
                        "dom": np.zeros(e * num_domains, np.int64),
                    }
                )
            acc = layers[layer]
            acc["count"] += np.bincount(chosen, minlength=e)
            acc["prob"] += probs.double().sum(dim=0).numpy()
            acc["dom"] += np.bincount(chosen * num_domains + dom, minlength=e * num_domains)
    return {
        "num_samples": n,
        "layers": [
            {
                "topk_count": a["count"].tolist(),
                "mean_prob": [round(float(p), 6) for p in a["prob"] / max(positions, 1)],
                "by_label": [[] for _ in range(a["count"].shape[0])],
                "by_domain": a["dom"].reshape(-1, num_domains).tolist(),
            }
            for a in layers
        ],
    }


def evaluate_lms(
    models: dict[int, Any],
    tokens: np.ndarray,
    domains: np.ndarray,
    num_domains: int,
    clients: tuple[Any, ...],
    global_test: np.ndarray,
) -> dict[str, Any]:
    """Per-byte perplexity of per-client language models: each on its local test split
    (personalised) and on the global test set, overall and per domain.

    Parameters
    ----------
    models
        Client id → a callable returning that client's model (loaded one at a time).
    clients, global_test
        The partition's splits and global test indices.

    Returns
    -------
    dict
        ``clients``: per client ``{id, local_ppl, local_n, global_ppl}``; ``mean_local_ppl``,
        ``worst_local_ppl`` (the highest), ``mean_global_ppl``, ``local_ppl_by_domain`` (every
        client's local test windows pooled, per domain) and ``global_ppl_by_domain`` (the mean
        over clients of each one's global-test perplexity on that domain).
    """
    rows = []
    nll_sum, nll_n = np.zeros(num_domains), np.zeros(num_domains)
    per_client_domain: list[list[float | None]] = []
    dg = domains[global_test]
    for cid in sorted(models):
        model = models[cid]()
        test = clients[cid].test
        local = sample_nll(model, tokens[test])
        np.add.at(nll_sum, domains[test], local)
        np.add.at(nll_n, domains[test], 1)
        glob = sample_nll(model, tokens[global_test])
        per_client_domain.append([perplexity(glob[dg == d]) for d in range(num_domains)])
        rows.append(
            {
                "id": cid,
                "local_ppl": perplexity(local),
                "local_n": int(test.shape[0]),
                "global_ppl": perplexity(glob),
            }
        )
    locals_ = [r["local_ppl"] for r in rows if r["local_ppl"] is not None]
    globals_ = [r["global_ppl"] for r in rows if r["global_ppl"] is not None]
    by_domain = []
    for d in range(num_domains):
        vals = [v for row in per_client_domain if (v := row[d]) is not None]
        by_domain.append(round(float(np.mean(vals)), 6) if vals else None)
    return {
        "mean_local_ppl": round(float(np.mean(locals_)), 6) if locals_ else None,
        "worst_local_ppl": round(float(np.max(locals_)), 6) if locals_ else None,
        "mean_global_ppl": round(float(np.mean(globals_)), 6) if globals_ else None,
        "local_ppl_by_domain": [
            round(math.exp(s / n), 6) if n else None for s, n in zip(nll_sum, nll_n, strict=True)
        ],
        "global_ppl_by_domain": by_domain,
        "clients": rows,
    }
