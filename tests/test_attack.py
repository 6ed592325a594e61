"""Simulated malicious clients (fedmoe.attack): each attack by hand, the recipe's ``attack:`` and
``variants:`` sections, and a whole attacked run through the CLI."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import clean_failure

from fedmoe.attack import AttackConfig, AttackContext, AttackKind, malicious_clients, poison_upload
from fedmoe.attack.alie import z_max
from fedmoe.attack.mimicry import popular_rows
from fedmoe.errors import ParamError, UsageError
from fedmoe.model import MoEConfig, init_model, schema_for, state_of
from fedmoe.run.recipe import recipe_from_dict

Run = Callable[..., Any]
CFG = MoEConfig(
    input_shape=(1, 4, 4), num_classes=3, embed_hidden=8, embed_dim=6, num_experts=3,
    expert_hidden=5,
)  # fmt: skip
SCHEMA = schema_for(CFG)


def _ctx(scale: float | None = None, benign: int = 3, rank: int = 0) -> AttackContext:
    start = state_of(init_model(CFG, seed=0))
    trained = {k: v + 0.01 * (i + 1) for i, (k, v) in enumerate(sorted(start.items()))}
    others = tuple(state_of(init_model(CFG, seed=10 + b)) for b in range(benign))
    return AttackContext(SCHEMA, start, trained, others, scale, rank, 2, benign + 2, 123)


def test_sign_flip_and_scaling_by_hand() -> None:
    ctx = _ctx()
    flip = poison_upload(AttackKind.SIGN_FLIP, ctx)
    boost = poison_upload(AttackKind.SCALING, _ctx(scale=3.0))
    for name in ctx.trained:
        delta = ctx.trained[name] - ctx.start[name]
        assert torch.allclose(flip[name], ctx.start[name] - delta)
        assert torch.allclose(boost[name], ctx.start[name] + 3.0 * delta)


def test_an_attack_on_some_parts_sends_the_rest_honestly() -> None:
    from fedmoe.attack import AttackParts
    from fedmoe.model.schema import Role

    ctx = _ctx()
    shared = poison_upload(AttackKind.SIGN_FLIP, ctx, parts=AttackParts.SHARED)
    experts = poison_upload(AttackKind.SIGN_FLIP, ctx, parts=AttackParts.EXPERTS)
    for name in ctx.trained:
        expert = SCHEMA.role(name) is Role.EXPERT
        assert torch.equal(shared[name], ctx.trained[name]) == expert
        assert torch.equal(experts[name], ctx.trained[name]) == (not expert)


def test_noise_is_seeded_and_scaled_to_each_tensor() -> None:
    a = poison_upload(AttackKind.NOISE, _ctx())
    b = poison_upload(AttackKind.NOISE, _ctx())
    assert all(torch.equal(a[n], b[n]) for n in a)  # same seed, same draw
    ctx = _ctx()
    name = max(ctx.trained, key=lambda n: ctx.trained[n].numel())
    noise = (a[name] - ctx.start[name]).double()
    rms = float(ctx.trained[name].double().pow(2).mean().sqrt())
    assert float(noise.std()) == pytest.approx(rms, rel=0.15)  # σ = 1 × the tensor's RMS


def test_alie_shifts_by_z_standard_deviations() -> None:
    assert z_max(20, 4) == pytest.approx(0.38532, abs=1e-4)  # s = 11 − 4 = 7, Φ⁻¹(13/20)
    ctx = _ctx(scale=1.5)
    out = poison_upload(AttackKind.ALIE, ctx)
    name = SCHEMA.proxy(0)
    stack = torch.stack([b[name] for b in ctx.benign]).double()
    want = stack.mean(0) - 1.5 * stack.std(0, correction=0)
    assert torch.allclose(out[name].double(), want, atol=1e-6)


def test_popular_rows_rank_by_mean_cosine() -> None:
    rows, order = popular_rows(
        [torch.tensor([[1.0, 0.0], [1.0, 0.1]]), torch.tensor([[0.0, 1.0], [0.9, 0.0]])]
    )
    assert rows.shape == (4, 2)
    assert order.tolist()[-1] == 2  # (0, 1) is nearly orthogonal to the rest
    assert set(order.tolist()[:3]) == {0, 1, 3}


def test_mimicry_copies_popular_gate_rows_and_poisons_the_rest() -> None:
    ctx = _ctx(rank=1)
    out = poison_upload(AttackKind.MIMICRY, ctx, AttackKind.SIGN_FLIP)
    gate = SCHEMA.proxy(0)
    rows, order = popular_rows([b[gate] for b in ctx.benign])
    for j in range(CFG.num_experts):
        assert torch.equal(out[gate][j], rows[int(order[1 + 2 * j])].float())
    expert = SCHEMA.experts(0)[0].name
    delta = ctx.trained[expert] - ctx.start[expert]
    assert torch.allclose(out[expert], ctx.start[expert] - delta)


def test_malicious_clients_are_a_seeded_share() -> None:
    assert len(malicious_clients(0, 20, 0.2)) == 4
    assert malicious_clients(0, 20, 0.2) == malicious_clients(0, 20, 0.2)
    assert malicious_clients(0, 20, 0.2) != malicious_clients(1, 20, 0.2)
    assert malicious_clients(0, 20, 0.0) == ()
    with pytest.raises(ParamError, match="kinds must be one of"):
        AttackConfig(kinds=("nope",))  # type: ignore[arg-type]
    with pytest.raises(ParamError, match="poison must be an attack other than mimicry"):
        AttackConfig(kinds=(AttackKind.NOISE,), poison=AttackKind.MIMICRY)


def test_recipe_variants_and_attack_arms() -> None:
    r = recipe_from_dict(
        {
            "methods": ["fedmoe-da", "fedavg", "da-robust"],
            "fedmoe": {"top_p": 3, "candidates": 8},
            "variants": {"da-robust": {"method": "fedmoe-da", "expert_bound": 0.5}},
            "attack": {"kinds": ["noise", "mimicry"], "fraction": 0.25},
        }
    )
    assert r.arms[:4] == ("fedmoe-da", "fedmoe-da@noise", "fedmoe-da@mimicry", "fedavg")
    assert len(r.arms) == 9
    robust = r.method("da-robust@noise")
    assert (robust.top_p, robust.expert_bound) == (3, 0.5)  # type: ignore[attr-defined]
    assert r.attack_of("da-robust@noise") is AttackKind.NOISE and r.attack_of("fedavg") is None
    assert r.to_dict()["attack"]["kinds"] == ["noise", "mimicry"]
    assert "attack" not in recipe_from_dict({}).to_dict()  # an unattacked recipe is unchanged
    assert r.unused_variants == ()
    subset = recipe_from_dict(
        {"methods": ["fedavg"], "variants": {"a": {"method": "fedavg"}, "b": {"method": "local"}}}
    )
    assert subset.unused_variants == ("a", "b")  # defined, not listed: they would not run
    with pytest.raises(UsageError, match=r"variants\.x\.expert_bound must be >= 0"):
        recipe_from_dict({"variants": {"x": {"method": "fedmoe-da", "expert_bound": -1}}})
    with pytest.raises(UsageError, match="unknown method 'y'"):
        recipe_from_dict({"methods": ["y"], "variants": {"x": {"method": "fedavg"}}})
    with pytest.raises(UsageError, match="variant name 'fedavg'"):
        recipe_from_dict({"variants": {"fedavg": {"method": "fedavg"}}})
    with pytest.raises(UsageError, match=r"attack\.kinds must be one of"):
        recipe_from_dict({"attack": {"kinds": ["flip"]}})


def test_run_warns_of_variants_it_does_not_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli: Run
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("r.yaml").write_text(
        "rounds: 1\nmethods: [local]\nvariants: {v1: {method: fedavg}}\npartition: {clients: 4}\n"
    )
    r = run_cli("run", "r.yaml", "--out", "out")
    assert r.code == 0, r.err
    assert "warning: variants v1 are not in methods and do not run" in r.err
    assert [m for m in json.loads(Path("out/report.json").read_text())["methods"]] == ["local"]


def test_an_attacked_run_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli: Run
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(
        "rounds: 2\nmethods: [fedmoe-da, fedavg]\npartition: {clients: 10}\n"
        "model: {embed_hidden: 8, embed_dim: 8, num_experts: 4, expert_hidden: 8}\n"
        "train: {epochs: 1}\nfedmoe: {top_p: 3, candidates: 8}\n"
        "attack: {kinds: [sign-flip, mimicry], fraction: 0.2}\n"
    )
    r = run_cli("run", "r.yaml", "--out", "o", "-q", "--threads", "1", "--json")
    assert r.code == 0, r.stderr
    rows = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    bad = malicious_clients(0, 10, 0.2)
    assert len(bad) == 2
    by_arm = {(x["method"], x["round"]): x for x in rows}
    assert set(m for m, _ in by_arm) == {
        "fedmoe-da", "fedmoe-da@sign-flip", "fedmoe-da@mimicry",
        "fedavg", "fedavg@sign-flip", "fedavg@mimicry",
    }  # fmt: skip
    for (arm, _), row in by_arm.items():
        assert row["malicious"] == list(bad)  # every arm is evaluated on the benign clients
        assert row.get("attack") == (arm.split("@")[1] if "@" in arm else None)
    # what the attackers sent is recorded beside their honest training, bound by sha256
    adir = tmp_path / "o" / "rounds" / "fedmoe-da@mimicry" / "round-002"
    attack = json.loads((adir / "attack" / "attack.json").read_text())
    assert [c["client"] for c in attack["checkpoints"]] == list(bad)
    assert all(c["sha256"] != c["honest_sha256"] for c in attack["checkpoints"])
    # copying popular gate rows draws the targets' weight; flipping the gate pushes it away
    mim = by_arm[("fedmoe-da@mimicry", 2)]["sources_malicious"]
    flip = by_arm[("fedmoe-da@sign-flip", 2)]["sources_malicious"]
    assert mim > 2 * flip
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    arm = report["methods"]["fedavg@sign-flip"]
    assert arm["attack"] == "sign-flip"
    clean = report["methods"]["fedavg"]["mean_local_acc"]
    assert arm["drop_vs_clean"] == pytest.approx(clean - arm["mean_local_acc"], abs=1e-6)


def test_a_bad_attack_section_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli: Run
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text("attack: {kinds: [noise], fraction: 2}\n")
    r = run_cli("run", "r.yaml", "--out", "o")
    assert "recipe: attack.fraction must be <= 1, got 2" in clean_failure(r, 2)
    assert not (tmp_path / "o").exists()
