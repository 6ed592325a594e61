"""Training a cohort of clients together: the local rounds of many clients (FedMoE-DA, arXiv
2411.02115, Sec. III-A, step 1) as one computation, each client with its own model, data, seed
and optimiser state, **bit for bit** what :func:`fedmoe.train.local.fit` gives each client alone.

Why: a quickstart client's model is small (~30k parameters), so a local step is almost all
per-operation overhead — Python, autograd's graph, the optimiser's bookkeeping — about 4 ms of it
for 0.1 ms of arithmetic. A cohort stacks the clients' parameters along a leading client
dimension and takes one step for all of them: the same operations, each on C clients' tensors,
so the overhead is paid once per step instead of C times.

How it stays bit-identical to the one-client loop on one thread, as clients train
(``tests/test_train.py`` checks every parameter of every client, bit for bit, on ragged client
sizes, several MoE layers, every optimiser and FedProx):

- each client draws its mini-batches from its own ``torch.Generator`` exactly as ``fit`` does, and
  client c's step t is its own step t (a client whose round is over drops out of the cohort);
- the embedding's and gates' products are batched GEMMs (one per client, same shapes: a client's
  batch is padded with zero rows, which add exact zeros to every sum over rows);
- the experts run through the same grouped autograd function as the one-client model, with one
  group per (client, expert): each group's product is the very call it is alone, on operands
  with the same memory alignment (each client's rows start 64 bytes apart: BLAS kernels round
  by alignment);
- the task and balance losses are per client (sums over its own rows, divided by its own batch
  size) and the cohort's loss is their sum, so each client's gradient is its own loss's;
- the optimiser is torch's own functional Adam/AdamW (fused) or SGD on per-client views, one
  state per client and tensor, as ``torch.optim`` keeps them for one client.

Which models: the built-in classifier with the MLP embedding (any number of MoE layers, with or
without gate bias), fp32, any optimiser, FedProx. The CNN embedding and bfloat16 autocast train
client by client (:func:`supported`).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim.adam import adam
from torch.optim.sgd import sgd

from fedmoe.model import MoEConfig, build_model
from fedmoe.model.classifier import MoEClassifier
from fedmoe.model.experts import Experts, _GroupedMLP
from fedmoe.model.router import Router
from fedmoe.train.config import Optimizer, Precision, TrainConfig
from fedmoe.train.local import TrainResult, epoch_batches


def supported(config: MoEConfig, cfg: TrainConfig) -> bool:
    """Whether :func:`fit_cohort` trains this model with these settings (else: client by
    client)."""
    return config.embed != "cnn" and cfg.precision is Precision.FP32


@dataclass(frozen=True)
class _Layer:
    """The stacked tensors of one MoE layer: its gate and its experts (leading dimension C)."""

    gate: str
    gate_bias: str | None
    w1: str
    b1: str
    w2: str
    b2: str
    top_k: int


def _names(model: MoEClassifier) -> tuple[tuple[str, str, str, str], list[_Layer]]:
    """The state names of the embedding's tensors and of each MoE layer's, found through the
    model's own modules (not by matching names)."""
    name = {id(p): n for n, p in model.named_parameters()}
    embed = model.embed
    fc1, fc2 = embed.fc1, embed.fc2  # MLPEmbed
    assert isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear)
    assert fc1.bias is not None and fc2.bias is not None
    head = (name[id(fc1.weight)], name[id(fc1.bias)], name[id(fc2.weight)], name[id(fc2.bias)])
    layers = []
    for gate, experts in zip(model.routers(), model.expert_modules(), strict=True):
        assert isinstance(gate, Router) and isinstance(experts, Experts)
        layers.append(
            _Layer(
                name[id(gate.weight)],
                None if gate.bias is None else name[id(gate.bias)],
                name[id(experts.w1)],
                name[id(experts.b1)],
                name[id(experts.w2)],
                name[id(experts.b2)],
                gate.top_k,
            )
        )
    return head, layers


def fit_cohort(
    config: MoEConfig,
    starts: list[dict[str, torch.Tensor]],
    data: list[tuple[torch.Tensor, torch.Tensor]],
    cfg: TrainConfig,
    seeds: list[int],
) -> list[TrainResult]:
    """Train each client ``c`` from ``starts[c]`` on ``data[c]`` with seed ``seeds[c]``; the same
    results, bit for bit, as ``train_local(config, starts[c], *data[c], cfg, seeds[c])``.

    A result's ``seconds`` is the cohort's wall time shared equally among its clients.
    """
    begin = time.perf_counter()
    count = len(starts)
    template = build_model(config, starts[0])
    head, layers = _names(template)
    names = list(starts[0])
    params = {k: torch.stack([s[k] for s in starts]).requires_grad_(True) for k in names}
    anchors = {k: p.detach().clone() for k, p in params.items()} if cfg.prox_mu > 0 else None

    # every client's samples in one table
    table = torch.cat([x.reshape(x.shape[0], config.input_size) for x, _ in data])  # (N, I)
    labels = torch.cat([y for _, y in data])  # (N,)
    sizes = [int(y.shape[0]) for _, y in data]
    offsets = [0, *itertools.accumulate(sizes)]
    plans = [  # each client's mini-batches for the whole round, drawn as fit draws them
        [b for epoch in epoch_batches(n, cfg, torch.Generator().manual_seed(seed)) for b in epoch]
        for n, seed in zip(sizes, seeds, strict=True)
    ]
    total_steps = [len(p) for p in plans]
    per_epoch = [len(p) // cfg.epochs if cfg.epochs else 0 for p in plans]
    losses = [[0.0] * cfg.epochs for _ in range(count)]
    balances = [[0.0] * cfg.epochs for _ in range(count)]
    opt = _Optimiser(cfg, params, count)

    for step in range(max(total_steps, default=0)):
        active = [c for c in range(count) if step < total_steps[c]]
        groups: dict[int, list[int]] = {}  # batch size -> its clients: one GEMM shape each
        for c in active:
            groups.setdefault(int(plans[c][step].shape[0]), []).append(c)
        for v in params.values():
            v.grad = None
        total = None
        stats = []
        for rows, members in groups.items():
            index = torch.stack([plans[c][step] + offsets[c] for c in members])  # (A, B)
            whole = len(members) == count
            p = params if whole else {k: v[members] for k, v in params.items()}
            task, bal = _losses(config, p, head, layers, table[index], labels[index.reshape(-1)])
            loss = task + cfg.balance_coef * bal  # (A,)
            if anchors is not None:
                loss = loss + _proximal(p, anchors, None if whole else members, cfg.prox_mu)
            total = loss.sum() if total is None else total + loss.sum()
            stats.append((members, rows, task.detach(), bal.detach()))
        assert total is not None
        total.backward()
        opt.step(active)
        for members, rows, task, bal in stats:
            for c, t, q in zip(members, task.tolist(), bal.tolist(), strict=True):
                epoch = step // per_epoch[c]
                losses[c][epoch] += t * rows
                balances[c][epoch] += q * rows

    seconds = (time.perf_counter() - begin) / max(count, 1)
    return [
        TrainResult(
            state={k: v[c].detach().clone().contiguous() for k, v in params.items()},
            epoch_loss=tuple(t / max(sizes[c], 1) for t in losses[c]),
            epoch_balance=tuple(t / max(sizes[c], 1) for t in balances[c]),
            steps=total_steps[c],
            samples=sizes[c] * cfg.epochs,
            seconds=seconds,
        )
        for c in range(count)
    ]


ALIGN = 16  # rows: a client's expert inputs start at a multiple of 64 bytes, as its own would
SMALL_GEMM = 400  # below this many multiply-adds torch's bmm takes its own loop, not BLAS


class _Linear(torch.autograd.Function):
    """``x @ wᵀ + b`` per client (x (A, B, I), w (A, O, I), b (A, O) or None), rounded as
    ``nn.Linear`` rounds it for one client: the gradients in the orientation its backward uses
    (``gᵀ·x`` for the weight: ``xᵀ·g`` rounds differently for some shapes), and client by client
    where a batched product would not run the one-client kernel (a single row, which torch sends
    to another kernel, and products under :data:`SMALL_GEMM` multiply-adds, which ``bmm`` runs in
    its own loop)."""

    @staticmethod
    def forward(
        ctx: Any, flat: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None
    ) -> torch.Tensor:  # fmt: skip
        x = flat.view(w.shape[0], -1, flat.shape[1])  # (A, B, I): the graph sees (A·B, I) only
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        ctx.alone = x.shape[1] == 1 or x.shape[1] * x.shape[2] * w.shape[1] < SMALL_GEMM
        if ctx.alone:
            y = torch.stack(
                [
                    nn.functional.linear(x[a], w[a], None if b is None else b[a])
                    for a in range(len(x))
                ]
            )
        else:
            wt = w.transpose(1, 2)
            y = torch.bmm(x, wt) if b is None else torch.baddbmm(b.unsqueeze(1), x, wt)
        return y.view(flat.shape[0], -1)  # (A·B, O)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w = ctx.saved_tensors
        g = g.contiguous().view(x.shape[0], x.shape[1], -1)  # (A, B, O)
        gb = g.sum(1) if ctx.has_bias else None  # (A, O)
        if ctx.alone:
            gw = torch.stack([g[a].t().mm(x[a]) for a in range(len(x))])  # (A, O, I)
            gx = torch.stack([g[a].mm(w[a]) for a in range(len(x))])  # (A, B, I)
        else:
            gw = torch.bmm(g.transpose(1, 2), x)
            gx = torch.bmm(g, w)
        return (gx.view(-1, x.shape[2]) if ctx.needs_input_grad[0] else None), gw, gb


def _losses(
    config: MoEConfig,
    p: dict[str, torch.Tensor],
    head: tuple[str, str, str, str],
    layers: list[_Layer],
    x: torch.Tensor,  # (A, B, I) one batch of B samples per client
    y: torch.Tensor,  # (A·B,) their labels
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each client's task loss (mean cross-entropy) and balance loss on its batch: (A,), (A,)."""
    w1, b1, w2, b2 = (p[k] for k in head)
    cohort, rows = x.shape[0], x.shape[1]
    h = torch.relu(_Linear.apply(x.reshape(cohort * rows, -1), w1, b1))  # (A·B, F_e)
    h = _Linear.apply(h, w2, b2)  # (A·B, H): rows stay flat, as one client's batch is
    h = nn.functional.layer_norm(h, (h.shape[1],))
    balance = []
    for index, layer in enumerate(layers):
        out, probs, picked = _moe(config, p, layer, h, cohort)
        fraction = picked.to(probs.dtype) / (rows * layer.top_k)  # (A, E)
        mean_prob = probs.view(cohort, rows, -1).mean(dim=1)  # (A, E)
        balance.append(config.num_experts * torch.sum(fraction * mean_prob, dim=1))  # (A,)
        last = index == len(layers) - 1  # the classifying layer: its outputs are the logits
        h = out if last else nn.functional.layer_norm(h + out, (h.shape[1],))  # hidden: residual
    rows_loss = nn.functional.cross_entropy(h.float(), y, reduction="none")  # (A·B,)
    task = rows_loss.view(cohort, rows).mean(dim=1)  # (A,)
    bal = balance[0] if len(balance) == 1 else torch.stack(balance).mean(0)
    return task, bal


def _moe(
    config: MoEConfig, p: dict[str, torch.Tensor], layer: _Layer, h: torch.Tensor, cohort: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One MoE layer on the cohort's (A·B, H) rows (client by client): the experts' weighted
    outputs (A·B, O), the gate's probabilities (A·B, E) and each client's top-k assignment
    counts (A, E)."""
    experts, k = config.num_experts, layer.top_k
    bias = None if layer.gate_bias is None else p[layer.gate_bias]
    logits = _Linear.apply(h, p[layer.gate], bias)  # (A·B, E)
    probs = logits.float().softmax(dim=-1)
    weights, chosen = probs.topk(k, dim=-1)  # (A·B, k)
    if k > 1:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    weights = weights.to(h.dtype)
    rows = h.shape[0] // cohort
    owner = torch.arange(cohort).repeat_interleave(rows * k)  # (A·B·k,)
    group = owner * experts + chosen.reshape(-1)  # (A·B·k,) (client, expert)
    order = torch.argsort(group, stable=True)  # by client, then expert, then (row, slot)
    token = order // k  # (A·B·k,) the row of each sorted assignment
    picked = torch.bincount(group, minlength=cohort * experts)  # (A·E,)
    # each client's assignments start ALIGN rows apart, where one client's own would start: the
    # BLAS kernels round by the alignment of their operands; the gap is one more expert per
    # client, all zeros, whose rows are dropped
    used = rows * k
    span = -(-used // ALIGN) * ALIGN
    gap = span - used
    tensors = [p[n] for n in (layer.w1, layer.b1, layer.w2, layer.b2)]
    counts = picked.view(cohort, experts)
    if gap:
        tensors = [torch.cat([t, t.new_zeros(cohort, 1, *t.shape[2:])], dim=1) for t in tensors]
        counts = torch.cat([counts, counts.new_full((cohort, 1), gap)], dim=1)
        token = torch.cat([token.view(cohort, used), token.new_zeros(cohort, gap)], dim=1).reshape(
            -1
        )
    w1, b1, w2, b2 = (t.reshape(-1, *t.shape[2:]) for t in tensors)
    ys = _GroupedMLP.apply(h.index_select(0, token), counts.reshape(-1).tolist(), w1, b1, w2, b2)
    if gap:
        ys = ys.view(cohort, span, -1)[:, :used].reshape(cohort * used, -1)
        token = token.view(cohort, span)[:, :used].reshape(-1)
    ys = ys * weights.reshape(-1)[order].unsqueeze(1)  # (A·B·k, O)
    out = ys.new_zeros(h.shape[0], ys.shape[1]).index_add_(0, token, ys)
    return out, probs, picked.view(cohort, experts)


def _proximal(
    p: dict[str, torch.Tensor],
    anchors: dict[str, torch.Tensor],
    members: list[int] | None,
    mu: float,
) -> torch.Tensor:
    """FedProx's mu/2 · ||w − w_start||² per client (A,), as :func:`~fedmoe.train.local.
    proximal_term` computes it for one."""
    total = None
    for k, v in p.items():
        a = anchors[k] if members is None else anchors[k][members]
        term = (v - a).pow(2).flatten(1).sum(1)  # (A,)
        total = term if total is None else total + term
    assert total is not None
    return 0.5 * mu * total


class _Optimiser:
    """Each client's optimiser over its views of the stacked tensors: torch's functional Adam or
    AdamW (fused, as :func:`~fedmoe.train.local.make_optimizer` configures them) or SGD with
    momentum 0.9, with one state per client and tensor."""

    @torch.no_grad()
    def __init__(self, cfg: TrainConfig, params: dict[str, torch.Tensor], count: int) -> None:
        self.cfg = cfg
        self.params = list(params.values())
        # each client's views of the stacked tensors, made once (a step's view lists were 10 % of
        # a quickstart round): a client's view is the same memory at every step
        self.views = [[v[c] for v in self.params] for c in range(count)]
        if cfg.optimizer is Optimizer.SGD:
            self.momentum: list[list[torch.Tensor | None]] = [
                [None] * len(self.params) for _ in range(count)
            ]
        else:
            exp_avg = [torch.zeros_like(v) for v in self.params]
            exp_avg_sq = [torch.zeros_like(v) for v in self.params]
            self.exp_avg = [[m[c] for m in exp_avg] for c in range(count)]
            self.exp_avg_sq = [[s[c] for s in exp_avg_sq] for c in range(count)]
            self.steps = [
                [torch.zeros((), dtype=torch.float32) for _ in self.params] for _ in range(count)
            ]

    @torch.no_grad()
    def step(self, active: list[int]) -> None:
        """One step of every active client, from the stacked tensors' gradients."""
        cfg = self.cfg
        views = [v for c in active for v in self.views[c]]
        grads = [v.grad[c] for c in active for v in self.params if v.grad is not None]
        assert len(grads) == len(views)
        if cfg.optimizer is Optimizer.SGD:
            buffers = [b for c in active for b in self.momentum[c]]
            sgd(
                views, grads, buffers, foreach=False, weight_decay=cfg.weight_decay,
                momentum=0.9, lr=cfg.lr, dampening=0.0, nesterov=False, maximize=False,
            )  # fmt: skip
            width = len(self.params)
            for i, c in enumerate(active):
                self.momentum[c] = buffers[i * width : (i + 1) * width]
            return
        adam(
            views,
            grads,
            [m for c in active for m in self.exp_avg[c]],
            [s for c in active for s in self.exp_avg_sq[c]],
            [],
            [s for c in active for s in self.steps[c]],
            foreach=False,
            fused=True,
            decoupled_weight_decay=cfg.optimizer is Optimizer.ADAMW,
            amsgrad=False,
            beta1=0.9,
            beta2=0.999,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            eps=1e-8,
            maximize=False,
        )
