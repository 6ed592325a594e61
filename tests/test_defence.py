"""Per-target defences of the Eq. 11 merge (fedmoe.aggregate.defence), numbers by hand, and the
engine applying them to whole models."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import TINY_ROUND, clean_failure

from fedmoe.aggregate import FedMoEDA, ReduceKind, RoundInputs, Upload
from fedmoe.aggregate.defence import ExpertDefence, defend_row
from fedmoe.aggregate.engine import merge_states
from fedmoe.aggregate.reduce import Reduce
from fedmoe.errors import ParamError
from fedmoe.model import MoEConfig, init_model, schema_for, state_of
from fedmoe.plan.matrix import aggregation_matrix

F64 = torch.float64
Run = Callable[..., Any]


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


def test_no_defence_is_the_weighted_mean() -> None:
    x = t([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]])
    w = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    out = defend_row(x, w, 0, ExpertDefence())
    assert out.tolist() == pytest.approx([0.5 + 0.9 + 0.1, 1.0 - 0.3 + 0.1])


def test_outlier_down_weighting_by_hand() -> None:
    x = t([[0.0], [1.0], [2.0], [100.0]])
    w = torch.full((4,), 0.25, dtype=F64)
    out = defend_row(x, w, 0, ExpertDefence(outlier=2.0))
    # median of the sources 1.5; distances 1.5, 0.5, 0.5, 98.5; their median (0.5+1.5)/2 = 1;
    # factors min(1, 2·1/d): 1 (own), 1, 1, 2/98.5
    f = 2 / 98.5
    weights = np.array([0.25, 0.25, 0.25, 0.25 * f])
    weights /= weights.sum()
    assert float(out[0]) == pytest.approx(float(weights @ np.array([0.0, 1.0, 2.0, 100.0])))
    assert float(out[0]) < 1.7  # the plain mean would be 25.75


def test_the_target_never_down_weights_itself() -> None:
    x = t([[100.0], [1.0], [2.0], [3.0]])
    w = torch.full((4,), 0.25, dtype=F64)
    out = defend_row(x, w, 0, ExpertDefence(outlier=1.0))
    # median 2.5; distances 97.5, 1.5, 0.5, 0.5 (median 1): factors 1 (own, exempt), 2/3, 1, 1
    weights = np.array([0.25, 0.25 * 2 / 3, 0.25, 0.25])
    weights /= weights.sum()
    assert float(out[0]) == pytest.approx(float(weights @ np.array([100.0, 1.0, 2.0, 3.0])))


def test_norm_bound_against_the_targets_own_by_hand() -> None:
    x = t([[3.0, 4.0], [33.0, 44.0]])  # own norm 5; the source's difference (30, 40) has norm 50
    w = torch.tensor([0.5, 0.5], dtype=F64)
    out = defend_row(x, w, 0, ExpertDefence(bound=0.5))
    # the difference is scaled to norm 0.5·5 = 2.5: (1.5, 2); mean of (3,4) and (4.5,6)
    assert out.tolist() == pytest.approx([3.75, 5.0])
    inside = defend_row(t([[3.0, 4.0], [4.0, 4.0]]), w, 0, ExpertDefence(bound=0.5))
    assert inside.tolist() == pytest.approx([3.5, 4.0])  # within the radius: untouched


def test_trust_in_the_targets_own_update_by_hand() -> None:
    start = torch.tensor([0.0, 0.0], dtype=F64)
    x = t([[1.0, 0.0], [2.0, 1.0], [-1.0, 0.0], [0.0, 3.0]])  # own update (1, 0)
    w = torch.full((4,), 0.25, dtype=F64)
    out = defend_row(x, w, 0, ExpertDefence(trust=True), start)
    # cosines with (1, 0): own 1, (2,1) → 2/√5, (-1,0) → -1 → 0, (0,3) → 0
    c = 2 / math.sqrt(5)
    want = (np.array([1.0, 0.0]) + c * np.array([2.0, 1.0])) / (1 + c)
    assert out.tolist() == pytest.approx(want.tolist())
    assert defend_row(x, w, 0, ExpertDefence(trust=True)).tolist() == pytest.approx(
        [0.5, 1.0]
    )  # without the start: the plain mean


def test_aligned_mean_over_a_targets_sources_uses_their_own_starts() -> None:
    from fedmoe.aggregate.reduce import reduce_tensors

    x = t([[1.0, 1.0], [0.0, 2.0], [3.0, 3.0]])
    starts = t([[0.0, 0.0], [-1.0, 1.0], [4.0, 4.0]])  # updates (1,1), (1,1), (-1,-1)
    w = torch.tensor([0.5, 0.25, 0.25], dtype=F64)
    d = ExpertDefence(Reduce(ReduceKind.ALIGNED_MEAN))
    out = defend_row(x, w, 0, d, starts=starts)
    want = reduce_tensors(d.reduce, list(x), (0.5, 0.25, 0.25), F64, list(starts))
    assert torch.equal(out, want)
    # the flipped source gets no weight: the weighted start plus the honest update (1, 1)
    base = 0.5 * starts[0] + 0.25 * starts[1] + 0.25 * starts[2]
    assert out.tolist() == pytest.approx((base + torch.tensor([1.0, 1.0], dtype=F64)).tolist())


def test_median_and_trimmed_mean_over_a_targets_sources() -> None:
    x = t([[1.0], [2.0], [9.0], [3.0], [-50.0]])
    w = torch.tensor([0.6, 0.1, 0.1, 0.1, 0.1], dtype=F64)
    med = defend_row(x, w, 0, ExpertDefence(Reduce(ReduceKind.MEDIAN)))
    assert float(med[0]) == 2.0  # weights ignored
    trim = defend_row(x, w, 0, ExpertDefence(Reduce(ReduceKind.TRIMMED_MEAN, trim=0.2)))
    assert float(trim[0]) == pytest.approx(2.0)  # -50 and 9 cut: mean of 1, 2, 3


def test_fedmoe_da_declares_its_defences() -> None:
    m = FedMoEDA(expert_reduce="median", expert_bound=0.3, expert_outlier=2)  # type: ignore[arg-type]
    d = m.defence()
    assert (d.reduce.kind, d.bound, d.outlier) == (ReduceKind.MEDIAN, 0.3, 2.0)
    assert FedMoEDA().defence().plain
    with pytest.raises(ParamError, match="expert_bound must be >= 0"):
        FedMoEDA(expert_bound=-1)


def _federation(n: int = 4) -> tuple[MoEConfig, dict[int, dict[str, torch.Tensor]]]:
    cfg = MoEConfig(
        input_shape=(1, 4, 4), num_classes=3, embed_hidden=8, embed_dim=6, num_experts=3,
        expert_hidden=5,
    )  # fmt: skip
    return cfg, {c: state_of(init_model(cfg, seed=c)) for c in range(n)}


def test_engine_applies_the_defence_per_target_row() -> None:
    """A poisoned expert of client 3 enters client 0's rows; with a norm bound the merged expert
    equals defend_row on that row's sources, computed here from the raw tensors."""
    cfg, states = _federation()
    schema = schema_for(cfg)
    name = schema.experts(0)[0].name  # a stacked (E, ...) expert tensor
    states[3] = {k: v.clone() for k, v in states[3].items()}
    states[3][name] *= 1000.0  # client 3 sends huge experts
    gates = {c: s[schema.proxy(0)] for c, s in states.items()}
    from fedmoe.affinity import compute_affinity

    uploads = {c: Upload(c, 10, 1, (gates[c],)) for c in states}
    aff = compute_affinity(uploads, candidates=12, num_classes=3)
    method = FedMoEDA(top_p=11, tau=1.0, candidates=12, expert_bound=0.2)  # every source kept
    matrices = tuple(
        aggregation_matrix(layer.neighbours, layer.index, method.top_p, method.tau)
        for layer in aff.layers
    )
    inputs = RoundInputs(1, schema, tuple(states), uploads, matrices=matrices, matrix_round=1)
    plain = merge_states(FedMoEDA(top_p=11, tau=1.0, candidates=12).spec(
        RoundInputs(1, schema, tuple(states), uploads, matrices=matrices, matrix_round=1)
    ), schema, states)  # fmt: skip
    out = merge_states(method.spec(inputs), schema, states)
    a = matrices[0]
    e = cfg.num_experts
    for j in range(e):
        m0 = a.index.index(0, j)
        lo, hi = int(a.indptr[m0]), int(a.indptr[m0 + 1])
        srcs = a.sources[lo:hi]
        x = torch.stack(
            [states[a.index.key(int(s))[0]][name][a.index.key(int(s))[1]].double().flatten()
             for s in srcs]
        )  # fmt: skip
        own = [a.index.key(int(s)) for s in srcs].index((0, j))
        want = defend_row(x, torch.from_numpy(a.weights[lo:hi]), own, ExpertDefence(bound=0.2))
        assert torch.equal(out[0][name][j].flatten(), want.to(torch.float32))
        base = states[0][name][j].double()
        assert float((out[0][name][j].double() - base).norm()) <= 0.2 * float(base.norm()) * (
            1 + 1e-5
        )
    assert float(plain[0][name].abs().max()) > 10 * float(out[0][name].abs().max())
    assert math.isfinite(float(out[0][name].sum()))


def test_the_trust_defence_through_the_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli: Run
) -> None:
    """plan-sync --param fixes a defence in the plan; aggregate applies it, and refuses the trust
    defence without the participants' start models (--previous)."""
    monkeypatch.chdir(tmp_path)
    steps = [
        *TINY_ROUND,
        ("affinity", "r1/train-round.json", "--out", "aff.json", "-q"),
        ("plan-sync", "aff.json", "--top-p", "2", "-p", "expert_trust=true", "--out", "plan.json",
         "-q"),
    ]  # fmt: skip
    for argv in steps:
        assert run_cli(*argv).code == 0, argv
    assert json.loads((tmp_path / "plan.json").read_text())["params"]["expert_trust"] is True
    r = run_cli("aggregate", "--plan", "plan.json", "r1", "--out", "a")
    assert "expert_trust needs each participant's model" in clean_failure(r, 3)
    assert not (tmp_path / "a").exists()
    ok = run_cli("aggregate", "--plan", "plan.json", "r1", "--previous", "i.safetensors",
                 "--partition", "p.json", "--out", "b", "-q")  # fmt: skip
    assert ok.code == 0, ok.err
    r = run_cli("aggregate", "--method", "fedavg", "-p", "reduce=aligned-mean", "r1", "--out", "c")
    assert "reduce aligned-mean needs each participant's model from the start" in clean_failure(
        r, 3
    )
    ok = run_cli("aggregate", "--method", "fedavg", "-p", "reduce=aligned-mean", "r1",
                 "--previous", "i.safetensors", "--partition", "p.json", "--out", "d", "-q")  # fmt: skip
    assert ok.code == 0, ok.err
    assert run_cli("plan-sync", "aff.json", "--top-p", "2", "-p", "expert_reduce=aligned-mean",
                   "--out", "aligned.json", "-q").code == 0  # fmt: skip
    r = run_cli("aggregate", "--plan", "aligned.json", "r1", "--out", "e")
    assert "expert_reduce aligned-mean needs each participant's model" in clean_failure(r, 3)
    ok = run_cli("aggregate", "--plan", "aligned.json", "r1", "--previous", "i.safetensors",
                 "--partition", "p.json", "--out", "f", "-q")  # fmt: skip
    assert ok.code == 0, ok.err
    r = run_cli("plan-sync", "aff.json", "-p", "top_p=3", "--out", "x.json")
    assert "--param top_p: use --top-p" in clean_failure(r, 2)
    r = run_cli("plan-sync", "aff.json", "-p", "expert_bound=-2", "--out", "x.json")
    assert "--param expert_bound must be >= 0" in clean_failure(r, 2)


def test_aligned_mean_by_hand() -> None:
    """Updates against the median update get no weight; longer ones are cut to its length."""
    from fedmoe.aggregate.reduce import reduce_tensors

    starts = [torch.zeros(2) for _ in range(4)]
    ups = [[1.0, 0.0], [1.0, 0.2], [-1.0, 0.0], [10.0, 0.0]]  # honest, honest, flipped, scaled
    tensors = [torch.tensor(u) for u in ups]
    out = reduce_tensors(Reduce(ReduceKind.ALIGNED_MEAN), tensors, (0.25,) * 4, F64, starts)
    # median update r = (1, 0); cosines 1, 1/√1.04, -1 → 0, 1; scales 1, 1/√1.04, 1, 0.1
    k = 1 / math.sqrt(1.04)
    trust = np.array([0.25, 0.25 * k, 0.0, 0.25])
    scale = np.array([1.0, k, 1.0, 0.1])
    want = ((trust / trust.sum()) * scale) @ np.array(ups)
    assert out.tolist() == pytest.approx(want.tolist())
    moved = [torch.tensor([5.0, 5.0]) + t for t in tensors]
    shifted = reduce_tensors(
        Reduce(ReduceKind.ALIGNED_MEAN), moved, (0.25,) * 4, F64, [torch.full((2,), 5.0)] * 4
    )
    assert shifted.tolist() == pytest.approx((np.array([5.0, 5.0]) + want).tolist())
