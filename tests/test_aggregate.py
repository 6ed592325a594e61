"""Aggregation: every registered method on tiny in-memory models (hand-computed averages, Eq. 11,
invariants), and the plain linear merge of safetensors files through the CLI."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import clean_failure
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fedmoe.affinity import ExpertIndex, topk_cosine
from fedmoe.aggregate import (
    AGGREGATORS,
    ClientInfo,
    FedAvg,
    FedMoEDA,
    Local,
    NaiveMoE,
    OracleDomain,
    sample_weights,
)
from fedmoe.aggregate.engine import merge_states
from fedmoe.errors import InputError, UsageError
from fedmoe.io.manifest import sha256_file
from fedmoe.model import MoEConfig, init_model, state_of
from fedmoe.plan import AggregationMatrix, aggregation_matrix

Run = Callable[..., Any]
State = dict[str, torch.Tensor]

CFG = MoEConfig((5,), 3, embed_hidden=4, embed_dim=4, num_experts=3, expert_hidden=4)
CLIENTS = (0, 3, 7)  # ids, not positions
SAMPLES = {0: 10, 3: 30, 7: 20}
GROUPS = {0: 1, 3: 0, 7: 1}
EXPERT_NAMES = ("experts.b1", "experts.b2", "experts.w1", "experts.w2")


@pytest.fixture(scope="module")
def states() -> dict[int, State]:
    """Three different tiny models (init seeds 0, 3, 7)."""
    return {c: state_of(init_model(CFG, c)) for c in CLIENTS}


def infos(routing: dict[int, Any] | None = None) -> list[ClientInfo]:
    routing = routing or {}
    return [ClientInfo(c, SAMPLES[c], routing.get(c), GROUPS[c]) for c in CLIENTS]


def average(states: dict[int, State], name: str, weights: dict[int, float]) -> torch.Tensor:
    """Σ w_c · x_c in float64, by hand."""
    return sum(w * states[c][name].double() for c, w in weights.items())  # type: ignore[return-value]


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == torch.float32 and torch.allclose(a.double(), b.double(), rtol=0, atol=1e-6)


def copy(states: dict[int, State]) -> dict[int, State]:
    return {c: {k: v.clone() for k, v in s.items()} for c, s in states.items()}


def unchanged(before: dict[int, State], after: dict[int, State]) -> bool:
    return all(torch.equal(before[c][k], after[c][k]) for c in before for k in before[c])


# ---------------------------------------------------------------------------------------------
# the registry and the weights


def test_registry() -> None:
    assert list(AGGREGATORS) == ["fedmoe-da", "fedavg", "naive-moe", "local", "oracle-domain"]
    assert all(cls.name == key and cls.summary for key, cls in AGGREGATORS.items())


def test_sample_weights() -> None:
    assert sample_weights(infos()) == ((0, 10 / 60), (3, 30 / 60), (7, 20 / 60))
    zero = [ClientInfo(c, 0) for c in (1, 2, 5, 8)]
    assert sample_weights(zero) == tuple((c, 0.25) for c in (1, 2, 5, 8))


# ---------------------------------------------------------------------------------------------
# each method by hand


def test_fedavg_is_the_sample_weighted_average(states: dict[int, State]) -> None:
    before = copy(states)
    spec = FedAvg().spec(infos(), 3, gate_shared=False)  # FedAvg shares everything anyway
    assert spec.method == "fedavg" and spec.gate_shared
    out = merge_states(spec, states)
    assert unchanged(before, states)  # inputs are not modified
    w = {c: SAMPLES[c] / 60 for c in CLIENTS}
    for name in states[0]:
        # (n0·x0 + n1·x1 + n2·x2) / (n0 + n1 + n2)
        expected = (
            10 * states[0][name].double()
            + 30 * states[3][name].double()
            + 20 * states[7][name].double()
        ) / 60
        assert close(out[0][name], expected), name
        assert close(out[0][name], average(states, name, w))
        assert torch.equal(out[3][name], out[0][name]) and torch.equal(out[7][name], out[0][name])


def test_local_is_the_identity(states: dict[int, State]) -> None:
    spec = Local().spec(infos(), 3, gate_shared=True)
    assert not spec.gate_shared
    out = merge_states(spec, states)
    assert out.keys() == set(CLIENTS)
    assert all(torch.equal(out[c][k], states[c][k]) for c in CLIENTS for k in states[c])


def test_naive_moe_weights_expert_j_by_routed_counts(states: dict[int, State]) -> None:
    routing = {0: {"topk_count": [10, 0, 5]}, 3: {"topk_count": [30, 0, 5]}}  # 7: no statistics
    out = merge_states(NaiveMoE().spec(infos(routing), 3, gate_shared=False), states)
    # client 7 falls back to its sample count (20) for every expert
    per_expert = [
        {0: 10 / 60, 3: 30 / 60, 7: 20 / 60},
        {0: 0.0, 3: 0.0, 7: 1.0},
        {0: 5 / 30, 3: 5 / 30, 7: 20 / 30},
    ]
    for c in CLIENTS:
        for name in EXPERT_NAMES:
            for j, w in enumerate(per_expert):
                assert close(out[c][name][j], average(states, name, w)[j]), (c, name, j)
        for name in ("embed.fc1.weight", "gate.weight"):  # shared parts: by sample counts
            assert close(out[c][name], average(states, name, {k: SAMPLES[k] / 60 for k in CLIENTS}))


def test_naive_moe_expert_nobody_routes_to_is_a_plain_mean(states: dict[int, State]) -> None:
    routing = {c: {"topk_count": [1, 0, 2]} for c in CLIENTS}
    out = merge_states(NaiveMoE().spec(infos(routing), 3, gate_shared=True), states)
    # every client routed the same counts: expert 1 (nobody) and expert 0 are plain means
    mean = average(states, "experts.w1", dict.fromkeys(CLIENTS, 1 / 3))
    assert close(out[3]["experts.w1"][1], mean[1])
    assert close(out[3]["experts.w1"][0], mean[0])


def test_naive_moe_differs_from_fedavg(states: dict[int, State]) -> None:
    routing = {0: {"topk_count": [10, 0, 5]}, 3: {"topk_count": [30, 0, 5]}}
    a = merge_states(NaiveMoE().spec(infos(routing), 3, True), states)
    b = merge_states(FedAvg().spec(infos(routing), 3, True), states)
    assert torch.equal(a[0]["embed.fc1.weight"], b[0]["embed.fc1.weight"])
    assert torch.equal(a[0]["experts.w1"][0], b[0]["experts.w1"][0])  # loads ∝ samples here
    assert not torch.equal(a[0]["experts.w1"][2], b[0]["experts.w1"][2])


def test_oracle_domain_averages_within_groups_only(states: dict[int, State]) -> None:
    out = merge_states(OracleDomain().spec(infos(), 3, gate_shared=False), states)
    # group 1 = clients 0 and 7 (10 and 20 samples); group 0 = client 3 alone
    for name in states[0]:
        expected = (10 * states[0][name].double() + 20 * states[7][name].double()) / 30
        assert close(out[0][name], expected) and torch.equal(out[7][name], out[0][name])
        assert torch.equal(out[3][name], states[3][name])
    with pytest.raises(UsageError, match="needs each client's true domain group"):
        OracleDomain().spec([ClientInfo(0, 1, None, None), ClientInfo(1, 1, None, 0)], 3, False)


# ---------------------------------------------------------------------------------------------
# FedMoE-DA: Eq. 11

# target (client, expert) → [(source client, source expert, weight)]
EQ11 = {
    (0, 0): [(0, 0, 0.5), (3, 2, 0.3), (7, 1, 0.2)],  # another expert index at two peers
    (0, 1): [(0, 1, 0.6), (0, 2, 0.4)],  # one of the client's own other experts
    (0, 2): [(0, 2, 1.0)],
    (3, 0): [(3, 0, 0.25), (0, 0, 0.25), (7, 0, 0.25), (7, 2, 0.25)],
    (3, 1): [(7, 2, 0.9), (3, 1, 0.1)],  # its own expert is not even the largest weight
    (3, 2): [(3, 2, 0.7), (0, 1, 0.3)],
    (7, 0): [(7, 0, 1.0)],
    (7, 1): [(7, 1, 0.55), (3, 1, 0.45)],
    (7, 2): [(7, 2, 0.125), (7, 0, 0.375), (3, 0, 0.5)],
}


def eq11_matrix() -> AggregationMatrix:
    index = ExpertIndex(CLIENTS, 3)
    indptr, sources, weights = [0], [], []
    for m in range(index.size):
        for c, j, w in EQ11[index.key(m)]:
            sources.append(index.index(c, j))
            weights.append(w)
        indptr.append(len(sources))
    return AggregationMatrix(
        index,
        np.asarray(indptr, dtype=np.int64),
        np.asarray(sources, dtype=np.int64),
        np.asarray(weights, dtype=np.float64),
        np.full(len(weights), np.nan),
    )


@pytest.mark.parametrize("gate_shared", [False, True])
def test_fedmoe_da_reproduces_eq_11(states: dict[int, State], gate_shared: bool) -> None:
    before = copy(states)
    spec = FedMoEDA(eq11_matrix()).spec(infos(), 3, gate_shared)
    assert spec.method == "fedmoe-da" and spec.gate_shared == gate_shared
    out = merge_states(spec, states)
    assert unchanged(before, states)
    for (c, j), sources in EQ11.items():
        for name in EXPERT_NAMES:
            # θ_ij = Σ a_(ij),(i'j') θ_i'j', in float64 by hand
            expected = sum(w * states[sc][name][sj].double() for sc, sj, w in sources)
            assert close(out[c][name][j], expected), (c, j, name)
    fed = {c: SAMPLES[c] / 60 for c in CLIENTS}
    for c in CLIENTS:
        for name in ("embed.fc1.weight", "embed.fc1.bias", "embed.fc2.weight", "embed.fc2.bias"):
            assert close(out[c][name], average(states, name, fed))
        if gate_shared:
            assert close(out[c]["gate.weight"], average(states, "gate.weight", fed))
        else:
            assert torch.equal(out[c]["gate.weight"], states[c]["gate.weight"])
        assert out[c].keys() == states[c].keys()
        assert all(out[c][k].dtype == torch.float32 for k in out[c])


def test_fedmoe_da_refuses_a_plan_for_other_clients(states: dict[int, State]) -> None:
    other = [ClientInfo(0, 10), ClientInfo(3, 30), ClientInfo(8, 20)]
    with pytest.raises(InputError, match=r"differ in \[7, 8\]"):
        FedMoEDA(eq11_matrix()).spec(other, 3, False)


def test_identical_experts_merge_to_themselves() -> None:
    """Every client holds the same model whose experts are all equal (Eq. 11 also mixes expert
    indices): whatever the method and weights, nothing changes."""
    same = state_of(init_model(CFG, 11))
    for name in EXPERT_NAMES:
        same[name] = same[name][:1].expand_as(same[name]).clone()
    states = {c: {k: v.clone() for k, v in same.items()} for c in CLIENTS}
    routing = {0: {"topk_count": [3, 1, 0]}, 3: {"topk_count": [0, 9, 2]}}
    x = torch.randn(9, 4, generator=torch.Generator().manual_seed(0))
    planned = aggregation_matrix(topk_cosine(x, 9), ExpertIndex(CLIENTS, 3), 8, 0.3)
    aggregators = [
        FedMoEDA(eq11_matrix()),
        FedMoEDA(planned),
        FedAvg(),
        NaiveMoE(),
        Local(),
        OracleDomain(),
    ]
    for agg in aggregators:
        for gate_shared in (False, True):
            out = merge_states(agg.spec(infos(routing), 3, gate_shared), states)
            for c in CLIENTS:
                for k in same:
                    assert torch.equal(out[c][k], same[k]), (agg.name, c, k)


@pytest.mark.parametrize("name", list(AGGREGATORS))
def test_client_order_of_the_inputs_changes_nothing(states: dict[int, State], name: str) -> None:
    routing = {0: {"topk_count": [3, 1, 0]}, 3: {"topk_count": [0, 9, 2]}}
    agg = FedMoEDA(eq11_matrix()) if name == "fedmoe-da" else AGGREGATORS[name]()
    a = merge_states(agg.spec(infos(routing), 3, True), states)
    for order in ((7, 3, 0), (3, 7, 0)):
        shuffled = {c: dict(reversed(list(states[c].items()))) for c in order}
        b = merge_states(agg.spec(infos(routing), 3, True), shuffled)
        assert list(b) == list(CLIENTS)
        for c in CLIENTS:
            assert b[c].keys() == a[c].keys()
            assert all(torch.equal(a[c][k], b[c][k]) for k in a[c]), (name, c)
    if name != "fedmoe-da":  # the plan's numbering is fixed; the baselines take any order
        reordered = [infos(routing)[i] for i in (2, 0, 1)]
        b = merge_states(agg.spec(reordered, 3, True), states)
        for c in CLIENTS:
            assert all(torch.equal(a[c][k], b[c][k]) for k in a[c]), (name, c)


def test_half_precision_states_keep_their_dtype() -> None:
    states = {
        c: {k: v.to(torch.bfloat16) for k, v in state_of(init_model(CFG, c)).items()}
        for c in CLIENTS
    }
    out = merge_states(FedAvg().spec(infos(), 3, True), states)
    w = {c: SAMPLES[c] / 60 for c in CLIENTS}
    for k in states[0]:
        assert out[0][k].dtype == torch.bfloat16
        # accumulated in float64, rounded once
        assert torch.equal(out[0][k], average(states, k, w).to(torch.bfloat16))


# ---------------------------------------------------------------------------------------------
# the plain linear merge (CLI, --out FILE.safetensors)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def write(path: Path, tensors: dict[str, torch.Tensor], **meta: str) -> Path:
    save_file(tensors, str(path), metadata=meta or None)
    return path


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, dict[str, torch.Tensor]]:
    """A.safetensors and B.safetensors (same names, shapes, dtypes) in the working folder."""
    monkeypatch.chdir(tmp_path)
    a = {"w": torch.randn(3, 4, generator=gen(1)), "b": torch.randn(5, generator=gen(2))}
    b = {"w": torch.randn(3, 4, generator=gen(3)), "b": torch.randn(5, generator=gen(4))}
    write(tmp_path / "A.safetensors", a, num_samples="10", client_id="0", note="same")
    write(tmp_path / "B.safetensors", b, num_samples="30", client_id="1", note="same")
    return {"A": a, "B": b}


def test_linear_merge_values_and_metadata(
    files: dict[str, Any], tmp_path: Path, run_cli: Run
) -> None:
    r = run_cli("aggregate", "A.safetensors", "B.safetensors", "--weights", "0.25,0.75",
                "--out", "m.safetensors")  # fmt: skip
    assert (r.code, r.out) == (0, "m.safetensors\n"), r.err
    merged = load_file(str(tmp_path / "m.safetensors"))
    assert merged.keys() == {"w", "b"}
    for k in merged:
        expected = 0.25 * files["A"][k].double() + 0.75 * files["B"][k].double()
        assert merged[k].dtype == torch.float32 and close(merged[k], expected)
    meta = metadata(tmp_path / "m.safetensors")
    assert meta["note"] == "same"  # equal in every input: kept as it is
    assert "client_id" not in meta and "num_samples" not in meta  # differ: only in fedmoe_merge
    assert "fedmoe_version" in meta
    prov = json.loads(meta["fedmoe_merge"])
    assert prov == {
        "method": "linear",
        "sources": [
            {"path": "A.safetensors", "sha256": sha256_file(tmp_path / "A.safetensors"),
             "weight": 0.25, "metadata": {"num_samples": "10", "client_id": "0", "note": "same"}},
            {"path": "B.safetensors", "sha256": sha256_file(tmp_path / "B.safetensors"),
             "weight": 0.75, "metadata": {"num_samples": "30", "client_id": "1", "note": "same"}},
        ],
    }  # fmt: skip


def test_fedavg_and_mean_weights(files: dict[str, Any], tmp_path: Path, run_cli: Run) -> None:
    r = run_cli("aggregate", "A.safetensors", "B.safetensors", "--method", "fedavg",
                "--out", "f.safetensors", "--json", "-q")  # fmt: skip
    assert r.code == 0 and r.err == ""
    payload = json.loads(r.out)
    assert payload["weights"] == [0.25, 0.75]  # num_samples 10 and 30
    assert payload["tensors"] == 2 and payload["sha256"] == sha256_file(tmp_path / "f.safetensors")
    f = load_file(str(tmp_path / "f.safetensors"))
    assert close(f["w"], 0.25 * files["A"]["w"].double() + 0.75 * files["B"]["w"].double())
    assert json.loads(metadata(tmp_path / "f.safetensors")["fedmoe_merge"])["method"] == "fedavg"
    r = run_cli("aggregate", "A.safetensors", "B.safetensors", "--out", "mean.safetensors", "-q")
    assert r.code == 0
    mean = load_file(str(tmp_path / "mean.safetensors"))
    assert close(mean["b"], (files["A"]["b"].double() + files["B"]["b"].double()) / 2)
    # a file without num_samples cannot be weighted by it
    write(tmp_path / "C.safetensors", files["A"])
    r = run_cli("aggregate", "A.safetensors", "C.safetensors", "--method", "fedavg",
                "--out", "g.safetensors")  # fmt: skip
    assert "fedavg needs a num_samples metadata entry in every file" in clean_failure(r, 3)
    assert not (tmp_path / "g.safetensors").exists()


@pytest.mark.parametrize(
    ("other", "message"),
    [
        ({"w": torch.zeros(3, 4)}, "Error: tensor b is missing from B2.safetensors"),
        ({"w": torch.zeros(4, 3), "b": torch.zeros(5)},
         "Error: tensor w: A.safetensors has torch.float32 [3, 4], B2.safetensors has "
         "torch.float32 [4, 3]"),
        ({"w": torch.zeros(3, 4, dtype=torch.float64), "b": torch.zeros(5)},
         "Error: tensor w: A.safetensors has torch.float32 [3, 4], B2.safetensors has "
         "torch.float64 [3, 4]"),
        ({"w": torch.zeros(3, 4), "b": torch.zeros(5), "extra": torch.zeros(1)},
         "Error: tensor extra is missing from A.safetensors"),
    ],
)  # fmt: skip
def test_mismatched_files_are_refused(
    files: dict[str, Any],
    tmp_path: Path,
    run_cli: Run,
    other: dict[str, torch.Tensor],
    message: str,
) -> None:
    write(tmp_path / "B2.safetensors", other)
    r = run_cli("aggregate", "A.safetensors", "B2.safetensors", "--out", "m.safetensors")
    assert clean_failure(r, 3) == message
    assert not (tmp_path / "m.safetensors").exists()


def test_on_missing_intersection_keeps_the_common_names(
    files: dict[str, Any], tmp_path: Path, run_cli: Run
) -> None:
    write(tmp_path / "B2.safetensors", {"w": files["B"]["w"], "extra": torch.ones(2)})
    r = run_cli("aggregate", "A.safetensors", "B2.safetensors", "--on-missing", "intersection",
                "--weights", "0.5,0.5", "--out", "m.safetensors", "-q")  # fmt: skip
    assert r.code == 0, r.err
    merged = load_file(str(tmp_path / "m.safetensors"))
    assert list(merged) == ["w"]
    assert close(merged["w"], (files["A"]["w"].double() + files["B"]["w"].double()) / 2)
    write(tmp_path / "C.safetensors", {"other": torch.ones(2)})
    r = run_cli("aggregate", "A.safetensors", "C.safetensors", "--on-missing", "intersection",
                "--out", "n.safetensors")  # fmt: skip
    assert "no tensor name in common" in clean_failure(r, 3)
    r = run_cli("aggregate", "A.safetensors", "C.safetensors", "--on-missing", "union",
                "--out", "n.safetensors")  # fmt: skip
    assert "--on-missing must be one of error, intersection" in clean_failure(r, 2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_writes_nothing(
    files: dict[str, Any], tmp_path: Path, run_cli: Run, bad: float
) -> None:
    b = {k: v.clone() for k, v in files["B"].items()}
    b["w"][2, 1] = bad
    write(tmp_path / "B.safetensors", b)
    before = sorted(p.name for p in tmp_path.iterdir())
    r = run_cli("aggregate", "A.safetensors", "B.safetensors", "--weights", "0,1",
                "--out", "m.safetensors")  # fmt: skip
    assert clean_failure(r, 3) == "Error: B.safetensors: tensor w contains NaN or Inf"
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temp file


def test_overflow_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli: Run) -> None:
    monkeypatch.chdir(tmp_path)
    big = torch.full((4,), 60000.0, dtype=torch.float16)
    write(tmp_path / "A.safetensors", {"x": big})
    write(tmp_path / "B.safetensors", {"x": big})
    r = run_cli("aggregate", "A.safetensors", "B.safetensors", "--weights", "1e30,1e30",
                "--out", "m.safetensors")  # fmt: skip
    assert "tensor x: the weighted sum overflows torch.float16" in clean_failure(r, 3)
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_and_high_precision_round_trip_their_dtype(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli: Run, dtype: torch.dtype
) -> None:
    monkeypatch.chdir(tmp_path)
    a, b = torch.randn(64, generator=gen(5)).to(dtype), torch.randn(64, generator=gen(6)).to(dtype)
    write(tmp_path / "A.safetensors", {"x": a})
    write(tmp_path / "B.safetensors", {"x": b})
    r = run_cli("aggregate", "A.safetensors", "B.safetensors", "--weights", "0.3,0.7",
                "--out", "m.safetensors", "-q")  # fmt: skip
    assert r.code == 0, r.err
    out = load_file(str(tmp_path / "m.safetensors"))["x"]
    assert out.dtype == dtype
    exact = 0.3 * a.double() + 0.7 * b.double()
    eps = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float64: 2.0**-53}[dtype]
    scale = 0.3 * a.double().abs() + 0.7 * b.double().abs()  # rounding errors scale with inputs
    assert bool(((out.double() - exact).abs() <= 4 * eps * scale).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_merge_is_rounded_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli: Run, dtype: torch.dtype
) -> None:
    """With weights 0.75 and 0.25 every product and sum is exact in float32 (8/11-bit inputs), so
    the correctly rounded result is (0.75·a + 0.25·b) computed in float32, cast once."""
    monkeypatch.chdir(tmp_path)
    a = torch.randn(256, generator=gen(7)).to(dtype)
    b = torch.randn(256, generator=gen(8)).to(dtype)
    write(tmp_path / "A.safetensors", {"x": a})
    write(tmp_path / "B.safetensors", {"x": b})
    r = run_cli("aggregate", "A.safetensors", "B.safetensors", "--weights", "0.75,0.25",
                "--out", "m.safetensors", "-q")  # fmt: skip
    assert r.code == 0, r.err
    out = load_file(str(tmp_path / "m.safetensors"))["x"]
    assert torch.equal(out, (0.75 * a.float() + 0.25 * b.float()).to(dtype))


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("--weights", "0.5"), 2, "--weights has 1 values for 2 files"),
        (("--weights", "0.5,x"), 2, "--weights '0.5,x': expected numbers like 0.5,0.5"),
        (("--weights", "0.5,nan"), 2, "--weights must be finite"),
        (("--method", "linear"), 2, "--method linear needs --weights"),
        (("--method", "ties"), 2, "plain --method must be one of mean, fedavg, linear"),
        (("--plan", "p.json"), 2, "--plan needs a folder --out"),
    ],
)
def test_plain_usage_errors(
    files: dict[str, Any],
    tmp_path: Path,
    run_cli: Run,
    args: tuple[str, ...],
    code: int,
    message: str,
) -> None:
    r = run_cli("aggregate", "A.safetensors", "B.safetensors", *args, "--out", "m.safetensors")
    assert message in clean_failure(r, code)
    assert not (tmp_path / "m.safetensors").exists()


def test_plain_merge_refuses_integers_and_existing_output(
    files: dict[str, Any], tmp_path: Path, run_cli: Run
) -> None:
    write(tmp_path / "I.safetensors", {"n": torch.arange(3)})
    write(tmp_path / "J.safetensors", {"n": torch.arange(3)})
    r = run_cli("aggregate", "I.safetensors", "J.safetensors", "--out", "m.safetensors")
    assert "tensor n has dtype torch.int64; only floating tensors merge" in clean_failure(r, 3)
    (tmp_path / "m.safetensors").write_text("keep\n")
    r = run_cli("aggregate", "A.safetensors", "B.safetensors", "--out", "m.safetensors")
    assert "m.safetensors exists" in clean_failure(r, 4)
    assert (tmp_path / "m.safetensors").read_text() == "keep\n"
    r = run_cli("aggregate", "A.safetensors", "B.safetensors", "--out", "m.safetensors",
                "--force", "-q")  # fmt: skip
    assert r.code == 0 and load_file(str(tmp_path / "m.safetensors")).keys() == {"w", "b"}
    (tmp_path / "T.safetensors").write_bytes((tmp_path / "A.safetensors").read_bytes()[:-7])
    r = run_cli("aggregate", "A.safetensors", "T.safetensors", "--out", "t.safetensors")
    assert "T.safetensors: tensor" in clean_failure(r, 3) and "truncated" in r.err
