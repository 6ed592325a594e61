"""The MoE layer (top-2 of 8 experts, d = 256, hidden 512) forward + backward against a dense MLP
with the same active parameters (hidden 2 × 512) measured in the same run, at 1 and 2 threads; and
one full local training step of a ~2M-parameter MoE classifier at batch 32 (fused vs default Adam).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from bench.common import Row, median_time, threads
from fedmoe.model import Experts, MoEConfig, Router, init_model
from fedmoe.train.config import Precision
from fedmoe.train.local import TrainConfig, autocast, bf16_native, make_optimizer


def _samples_per_s(step, batch: int, budget_s: float) -> float:
    step()
    start = time.perf_counter()
    n = 0
    while time.perf_counter() - start < budget_s / 5 or n < 3:
        step()
        n += 1
    per = (time.perf_counter() - start) / n
    reps = max(3, int(budget_s / per / 3))

    def many() -> None:
        for _ in range(reps):
            step()

    return batch * reps / median_time(many, repeats=3, warmup=0)


def layer_rows(quick: bool) -> list[Row]:
    d, f, e, k = 256, 512, 8, 2
    gen = torch.Generator().manual_seed(0)
    router, experts = Router(d, e, k), Experts(e, d, f, d)
    experts.reset_parameters(gen)
    dense = nn.Sequential(nn.Linear(d, k * f), nn.ReLU(), nn.Linear(k * f, d))
    rows = []
    batches = (256,) if quick else (64, 256, 1024)
    for t in (1, 2):
        threads(t)
        for b in batches:
            x = torch.randn(b, d, generator=gen)

            def moe_step(x: torch.Tensor = x) -> None:
                _, w, idx = router(x)
                experts(x, w, idx).sum().backward()

            def dense_step(x: torch.Tensor = x) -> None:
                dense(x).sum().backward()

            budget = 0.3 if quick else 1.5
            ours = _samples_per_s(moe_step, b, budget)
            ref = _samples_per_s(dense_step, b, budget)
            target, met = "", None
            if b == 256:
                goal = 0.75 if t == 1 else 0.7
                target, met = f"≥ {goal}× dense", ours / ref >= goal
            rows.append(
                Row(
                    f"MoE layer fwd+bwd, top-2 of 8, d=256, B={b}, {t} thread(s)",
                    ours,
                    ref,
                    "1/s",
                    ours / ref,
                    target,
                    met,
                    "reference: dense MLP, same active parameters",
                )
            )
    threads(2)
    return rows


STEP_CONFIG = MoEConfig((1, 28, 28), 10, "mlp", 1024, 256, 8, 2, 512)  # ~2.16M parameters


def _step_time(opt_of: Callable[[nn.Module], torch.optim.Optimizer], train: TrainConfig,
               reps: int) -> tuple[float, int]:  # fmt: skip
    """Seconds per local step (batch 32, cross-entropy + balance loss, under ``train``'s
    precision) of a fresh :data:`STEP_CONFIG` model with the optimiser ``opt_of`` makes, and its
    parameter count."""
    model = init_model(STEP_CONFIG, 0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (32,), generator=gen)
    opt = opt_of(model)

    def many() -> None:
        for _ in range(reps):
            with autocast(train):
                out = model(x)
                loss = nn.functional.cross_entropy(out.logits.float(), y)
                loss = loss + 0.01 * out.balance_loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return median_time(many, repeats=3) / reps, sum(p.numel() for p in model.parameters())


def step_rows(quick: bool) -> list[Row]:
    """One local step with fused Adam against the default (unfused) loop."""
    train, reps = TrainConfig(), (10 if quick else 50)
    fused, params = _step_time(lambda m: make_optimizer(list(m.parameters()), train), train, reps)
    plain, _ = _step_time(lambda m: torch.optim.Adam(m.parameters(), lr=3e-3), train, reps)
    return [
        Row(
            f"local step, {params / 1e6:.2f}M-parameter MoE, batch 32, fused Adam",
            fused,
            plain,
            "s",
            plain / fused,
            "≤ 5 ms",
            fused <= 0.005,
            "reference: the same step with default (unfused) Adam",
        )
    ]


def bf16_rows(quick: bool) -> list[Row]:
    """The same local step (fused Adam) with ``precision: bf16`` (CPU bfloat16 autocast, fp32
    master weights) against fp32, measured in the same run."""
    reps = 5 if quick else 20
    times = {}
    for precision in (Precision.FP32, Precision.BF16):
        train = TrainConfig(precision=precision)

        def fused(m: nn.Module, train: TrainConfig = train) -> torch.optim.Optimizer:
            return make_optimizer(list(m.parameters()), train)

        times[precision], _ = _step_time(fused, train, reps)
    units = "with" if bf16_native() else "without"
    return [
        Row(
            f"local step, bf16 autocast ({units} CPU bfloat16 units), batch 32",
            times[Precision.BF16],
            times[Precision.FP32],
            "s",
            times[Precision.FP32] / times[Precision.BF16],
            "",
            None,
            "reference: the same step in fp32; ratio = speed-up",
        )
    ]


def run(quick: bool) -> list[Row]:
    return layer_rows(quick) + step_rows(quick) + bf16_rows(quick)
