"""Aggregation: the contract (round inputs → merge spec → engine) of every registered method on
tiny in-memory models (hand-computed averages, Eq. 11 over the applied rows, partial
participation, invariants), the reduce kinds, the declared parameters, and the plain linear merge
of safetensors files through the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import clean_failure
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fedmoe.affinity import ExpertIndex, Upload, topk_cosine
from fedmoe.aggregate import (
    AGGREGATORS,
    CrossExpert,
    ExpertGroup,
    FedAvg,
    FedMoEDA,
    GateMode,
    Group,
    Interval,
    Local,
    MergeSpec,
    NaiveMoE,
    OracleDomain,
    Reduce,
    ReduceKind,
    RoundInputs,
    SameIndex,
    make_method,
    sample_weights,
)
from fedmoe.aggregate.engine import merge_states
from fedmoe.aggregate.fedmoe_da import SharedMix, Wire
from fedmoe.aggregate.reduce import reduce_tensors
from fedmoe.errors import InputError, ParamError, UsageError
from fedmoe.io.manifest import sha256_file
from fedmoe.model import (
    Layout,
    ModelSchema,
    MoEConfig,
    PartSizes,
    Role,
    TensorRule,
    init_model,
    schema_for,
    state_of,
)
from fedmoe.plan import AggregationMatrix, aggregation_matrix, identity_matrix
from fedmoe.round import plan_sync

Run = Callable[..., Any]
State = dict[str, torch.Tensor]
Rows = dict[tuple[int, int], list[tuple[int, int, float]]]

CFG = MoEConfig((5,), 3, embed_hidden=4, embed_dim=4, num_experts=3, expert_hidden=4)
CFG2 = dataclasses.replace(CFG, moe_layers=2)  # blocks.0.* (MoE layer 0), then gate/experts (1)
SCHEMA = schema_for(CFG)
CLIENTS = (0, 3, 7)  # ids, not positions
SAMPLES = {0: 10, 3: 30, 7: 20}
GROUPS = {0: 1, 3: 0, 7: 1}  # true domains: {0, 7} and {3}
EXPERT_NAMES = ("experts.b1", "experts.b2", "experts.w1", "experts.w2")
SHARED_NAMES = ("embed.fc1.bias", "embed.fc1.weight", "embed.fc2.bias", "embed.fc2.weight")
ROUTING = {0: {"topk_count": [3, 1, 0]}, 3: {"topk_count": [0, 9, 2]}}  # 7: none


def make_states(cfg: MoEConfig) -> dict[int, State]:
    return {c: state_of(init_model(cfg, c)) for c in CLIENTS}


@pytest.fixture(scope="module")
def states() -> dict[int, State]:
    """Three different tiny models (init seeds 0, 3, 7)."""
    return make_states(CFG)


def upload(client: int, routing: dict[str, Any] | None = None, layers: int = 1) -> Upload:
    """Client ``client``'s upload (its proxies play no part in a merge)."""
    proxies = tuple(torch.eye(3, 4) for _ in range(layers))
    return Upload(client, SAMPLES[client], 1, proxies, routing, GROUPS[client])  # IFCA: by domain


def round_inputs(
    participants: tuple[int, ...] = CLIENTS,
    routing: Mapping[int, dict[str, Any]] | None = None,
    *,
    schema: ModelSchema = SCHEMA,
    matrices: tuple[AggregationMatrix, ...] | None = None,
    matrix_round: int | None = None,
    round_: int = 1,
    groups: Mapping[int, int] = GROUPS,
) -> RoundInputs:
    """Round ``round_`` of the federation ``CLIENTS`` in which ``participants`` trained."""
    routing = routing or {}
    uploads = {c: upload(c, routing.get(c), schema.num_layers) for c in participants}
    return RoundInputs(round_, schema, CLIENTS, uploads, dict(groups), matrices, matrix_round)


def average(states: dict[int, State], name: str, weights: dict[int, float]) -> torch.Tensor:
    """Σ w_c · x_c in float64, by hand."""
    return wsum(w * states[c][name].double() for c, w in weights.items())


def wsum(terms: Iterable[torch.Tensor]) -> torch.Tensor:
    """Σ of the terms, left to right (float64 terms: the hand computation)."""
    return sum(terms, torch.zeros((), dtype=torch.float64))


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == torch.float32 and torch.allclose(a.double(), b.double(), rtol=0, atol=1e-6)


def copy(states: dict[int, State]) -> dict[int, State]:
    return {c: {k: v.clone() for k, v in s.items()} for c, s in states.items()}


def unchanged(before: dict[int, State], after: dict[int, State]) -> bool:
    return all(torch.equal(before[c][k], after[c][k]) for c in before for k in before[c])


def hand_matrix(rows: Rows, clients: tuple[int, ...], num_experts: int = 3) -> AggregationMatrix:
    """A from hand-written rows: target (client, expert) → [(source client, expert, weight)]."""
    index = ExpertIndex(clients, num_experts)
    indptr, sources, weights = [0], [], []
    for m in range(index.size):
        for c, j, w in rows[index.key(m)]:
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


def method(name: str) -> Any:
    return make_method(name, {"top_p": 2, "candidates": 3} if name == "fedmoe-da" else {})


def fedavg_by_hand(states: dict[int, State], name: str, present: tuple[int, ...]) -> torch.Tensor:
    """(Σ n_c · x_c) / Σ n_c over ``present``."""
    total = sum(SAMPLES[c] for c in present)
    return wsum(SAMPLES[c] * states[c][name].double() for c in present) / total


# ---------------------------------------------------------------------------------------------
# the registry, the declared parameters and the weights


def test_registry_and_declared_parameters() -> None:
    assert list(AGGREGATORS) == [
        "fedmoe-da", "fedavg", "naive-moe", "local", "oracle-domain", "fedprox", "fedper", "ifca",
    ]  # fmt: skip
    assert all(cls.name == key and cls.summary for key, cls in AGGREGATORS.items())
    robust = ["reduce", "trim", "clip", "krum_ratio"]
    assert list(FedAvg.parameters()) == robust
    assert list(NaiveMoE.parameters()) == robust and list(OracleDomain.parameters()) == robust
    assert list(Local.parameters()) == []
    assert list(FedMoEDA.parameters()) == [
        *robust, "top_p", "tau", "top_clients", "min_weight", "csls", "wire", "refresh_interval",
        "gate", "candidates", "shared", "pool_layers", "centred", "stale", "interval",
        "expert_reduce", "expert_bound", "expert_outlier", "expert_trust",
    ]  # fmt: skip
    assert all(FedMoEDA.parameters().values())  # every parameter has a help text
    assert [name for name, cls in AGGREGATORS.items() if cls.uses_matrix] == ["fedmoe-da"]
    assert [name for name, cls in AGGREGATORS.items() if not cls.moves] == ["local"]


def test_sample_weights() -> None:
    assert sample_weights([upload(c) for c in CLIENTS]) == (10 / 60, 30 / 60, 20 / 60)
    assert sample_weights([upload(7), upload(0)]) == (20 / 30, 10 / 30)  # in the order given
    zero = [Upload(c, 0, 1, (torch.eye(2),)) for c in (1, 2, 5, 8)]
    assert sample_weights(zero) == (0.25, 0.25, 0.25, 0.25)


def test_make_method_builds_the_declared_values() -> None:
    agg = make_method("fedavg", {"reduce": "median", "trim": 0.2})
    assert isinstance(agg, FedAvg) and agg.reduce is ReduceKind.MEDIAN
    assert agg.reducer() == Reduce(ReduceKind.MEDIAN, 0.2, 1.0)
    da = make_method("fedmoe-da", {"top_p": 2, "candidates": 3, "gate": "shared", "tau": 1})
    assert da == FedMoEDA(top_p=2, candidates=3, gate=GateMode.SHARED, tau=1.0)
    assert da.gate.value == "shared" and da.tau == 1.0 and isinstance(da.tau, float)
    assert make_method("fedmoe-da") == FedMoEDA()  # every parameter has a default
    assert FedMoEDA(top_p=20, candidates=21).candidates == 21  # candidates ≥ P + 1 is enough
    with pytest.raises(UsageError, match="unknown method 'nope'") as info:
        make_method("nope")
    assert info.value.hint == (
        "use one of fedmoe-da, fedavg, naive-moe, local, oracle-domain, fedprox, fedper, ifca"
    )


@pytest.mark.parametrize(
    ("name", "params", "key", "option"),
    [
        ("fedavg", {"reduce": "bogus"}, "reduce",
         "--reduce must be one of mean, median, trimmed-mean, clipped-mean, aligned-mean, multi-krum, got 'bogus'"),
        ("naive-moe", {"trim": 0.5}, "trim", "--trim must be < 0.5, got 0.5"),
        ("oracle-domain", {"clip": 0}, "clip", "--clip must be > 0, got 0.0"),
        ("fedmoe-da", {"top_p": -1}, "top_p", "--top-p must be >= 0, got -1"),
        ("fedmoe-da", {"top_p": 1.5}, "top_p", "--top-p must be an integer, got 1.5"),
        ("fedmoe-da", {"top_p": 20}, "candidates",
         "--candidates must be >= top_p + 1 = 21, got 16"),
        ("fedmoe-da", {"tau": 0}, "tau", "--tau must be > 0, got 0.0"),
        ("fedmoe-da", {"refresh_interval": 0}, "refresh_interval",
         "--refresh-interval must be >= 1, got 0"),
        ("fedmoe-da", {"gate": "both"}, "gate",
         "--gate must be one of per-client, shared, got 'both'"),
        ("fedmoe-da", {"interval": "never"}, "interval",
         "--interval must be one of matrix, sync, got 'never'"),
    ],
)  # fmt: skip
def test_parameter_errors_name_the_key_and_read_as_options(
    name: str, params: dict[str, Any], key: str, option: str
) -> None:
    with pytest.raises(ParamError) as info:
        make_method(name, params)
    err = info.value
    assert err.key == key and err.exit_code == 2 and isinstance(err, UsageError)
    assert err.as_option().startswith(option), err.as_option()
    assert str(err).startswith(key + " ")  # the core's own wording names the field


def test_unknown_parameters_are_usage_errors_naming_the_nearest() -> None:
    with pytest.raises(UsageError) as info:
        make_method("fedavg", {"redcue": "mean"})
    assert str(info.value) == "fedavg: unknown parameter 'redcue' (did you mean 'reduce'?)"
    with pytest.raises(UsageError) as info:
        make_method("local", {"reduce": "median"})
    assert str(info.value) == "local: unknown parameter 'reduce' (it has no parameters)"


def test_constructors_validate_like_make_method() -> None:
    with pytest.raises(ParamError) as info:
        FedMoEDA(top_p=-1)
    assert info.value.as_option() == "--top-p must be >= 0, got -1"
    with pytest.raises(ParamError) as info:
        FedMoEDA(top_p=20, candidates=16)
    assert info.value.key == "candidates"
    with pytest.raises(ParamError, match=r"trim must be < 0\.5"):
        Reduce(ReduceKind.TRIMMED_MEAN, trim=0.5)
    assert Reduce("median").kind is ReduceKind.MEDIAN  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# the reduce kinds, by hand


def scalars(*values: float) -> list[torch.Tensor]:
    return [torch.tensor([v], dtype=torch.float32) for v in values]


def reduced(
    kind: str, values: list[float], weights: tuple[float, ...] | None = None, **kw: Any
) -> float:
    w = weights or tuple(1 / len(values) for _ in values)
    out = reduce_tensors(Reduce(ReduceKind(kind), **kw), scalars(*values), w, torch.float32)
    assert out.shape == (1,) and out.dtype == torch.float32
    return float(out[0])


def test_mean_is_the_float64_weighted_sum_rounded_once() -> None:
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(7, 5, generator=g) for _ in range(3)]
    w = (0.1, 0.2, 0.7)
    exact = wsum(wi * t.double() for wi, t in zip(w, tensors, strict=True))
    out = reduce_tensors(Reduce(), tensors, w, torch.float32)
    assert torch.equal(out, exact.to(torch.float32))
    half = reduce_tensors(Reduce(), [t.to(torch.bfloat16) for t in tensors], w, torch.bfloat16)
    exact_half = wsum(wi * t.to(torch.bfloat16).double() for wi, t in zip(w, tensors, strict=True))
    assert half.dtype == torch.bfloat16 and torch.equal(half, exact_half.to(torch.bfloat16))
    assert reduced("mean", [1, 5, 2], (0.5, 0.25, 0.25)) == 0.5 + 1.25 + 0.5


@pytest.mark.parametrize(
    ("sizes", "n", "dtype"),
    [((3, 1, 4), 200_003, torch.float32), ((1,), 300_001, torch.float32), ((2, 5), 90_000,
     torch.bfloat16), ((8, 8, 8, 8), 65_537, torch.float32)],
)  # fmt: skip
def test_weighted_rows_is_the_whole_float64_product_rounded_once(
    sizes: tuple[int, ...], n: int, dtype: torch.dtype
) -> None:
    """Eq. 11's chunked kernel equals the product with the whole concatenated float64 matrix, bit
    for bit, across chunk edges (n spans several chunks and ends in a partial one) and dtypes;
    row j of the output mixes the sources in the order the blocks stack them."""
    from fedmoe.aggregate.reduce import CHUNK, weighted_rows

    g = torch.Generator().manual_seed(len(sizes))
    blocks = [torch.randn(k, n, generator=g).to(dtype) for k in sizes]
    u = sum(sizes)
    assert n > CHUNK // u  # more than one chunk
    weights = torch.rand(5, u, generator=g, dtype=torch.float64)
    weights /= weights.sum(dim=1, keepdim=True)
    whole = (weights @ torch.cat(blocks).to(torch.float64)).to(dtype)
    out = weighted_rows(weights, blocks, dtype)
    assert out.dtype == dtype and out.shape == (5, n)
    assert torch.equal(out, whole)
    one_hot = torch.zeros(1, u, dtype=torch.float64)
    one_hot[0, u - 1] = 1.0  # a row that takes only the last source: exactly that source
    assert torch.equal(weighted_rows(one_hot, blocks, dtype)[0], blocks[-1][-1])


@pytest.mark.parametrize(
    ("values", "expected"),
    [([1, 5, 2], 2.0), ([1, 2, 3, 10], 2.5), ([4], 4.0), ([-1, 7], 3.0), ([3, 3, 9, 3], 3.0)],
)
def test_median_is_the_middle_value_or_the_mean_of_the_two(
    values: list[float], expected: float
) -> None:
    assert reduced("median", values) == expected
    skewed = (
        tuple([0.97] + [0.03 / (len(values) - 1)] * (len(values) - 1)) if len(values) > 1 else None
    )
    assert reduced("median", values, skewed) == expected  # weights play no part


def test_median_is_coordinate_wise() -> None:
    tensors = [torch.tensor([1.0, 9.0, -2.0]), torch.tensor([5.0, 0.0, 4.0]),
               torch.tensor([2.0, 4.0, 8.0])]  # fmt: skip
    out = reduce_tensors(Reduce(ReduceKind.MEDIAN), tensors, (1 / 3,) * 3, torch.float32)
    assert out.tolist() == [2.0, 4.0, 4.0]


@pytest.mark.parametrize(
    ("trim", "values", "expected"),
    [
        (0.25, [0, 1, 2, 100], 1.5),  # ⌊0.25·4⌋ = 1 cut at each end: (1 + 2) / 2
        (0.1, [0, 1, 2, 100], 25.75),  # ⌊0.4⌋ = 0: the plain mean
        (0.2, [100, 0, 3, 1, 2], 2.0),  # ⌊1.0⌋ = 1: (1 + 2 + 3) / 3, whatever the order
        (0.4, [0, 1, 2, 100, -50], 1.0),  # ⌊2.0⌋ = 2: the median
        (0.0, [2, 4], 3.0),
    ],
)
def test_trimmed_mean_by_hand(trim: float, values: list[float], expected: float) -> None:
    assert reduced("trimmed-mean", values, trim=trim) == expected


def test_trimmed_mean_cuts_floor_of_trim_times_count_exactly() -> None:
    """⌊0.29 · 100⌋ = 29 values cut at each end: the mean of i² for i in 29..70."""
    values = [float(i * i) for i in range(100)]
    expected = sum(i * i for i in range(29, 71)) / 42
    assert reduced("trimmed-mean", values, trim=0.29) == pytest.approx(expected, rel=1e-7)


def test_clipped_mean_by_hand() -> None:
    """Sources (0,0), (1,0), (0,1), (100,100): median (0.5, 0.5); the first three deviations have
    norm √0.5 < clip = 1 and stay, the outlier's is cut to length 1 along (1,1)/√2:
    0.5 + 0.25·(−0.5 + 0.5 − 0.5) + 0.25/√2 per coordinate."""
    tensors = [torch.tensor(v) for v in ([0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [100.0, 100.0])]
    out = reduce_tensors(Reduce(ReduceKind.CLIPPED_MEAN, clip=1.0), tensors, (0.25,) * 4,
                         torch.float32)  # fmt: skip
    expected = 0.375 + 0.25 / math.sqrt(2)
    assert out.tolist() == pytest.approx([expected, expected], abs=1e-7)
    # a radius below every deviation: four unit directions that cancel, the median itself
    small = reduce_tensors(Reduce(ReduceKind.CLIPPED_MEAN, clip=0.1), tensors, (0.25,) * 4,
                           torch.float64)  # fmt: skip
    assert small.tolist() == pytest.approx([0.5, 0.5], abs=1e-12)
    # a radius above every deviation: the weighted mean
    big = reduce_tensors(Reduce(ReduceKind.CLIPPED_MEAN, clip=1e6), tensors, (0.25,) * 4,
                         torch.float64)  # fmt: skip
    assert big.tolist() == pytest.approx([25.25, 25.25], abs=1e-12)


@pytest.mark.parametrize("clip", [0.05, 0.5, 2.0])
def test_clipped_mean_stays_within_clip_of_the_median(clip: float) -> None:
    g = torch.Generator().manual_seed(1)
    tensors = [torch.randn(6, 4, generator=g) for _ in range(5)]
    tensors.append(torch.full((6, 4), 1e6))  # a far outlier
    w = (0.1, 0.1, 0.1, 0.1, 0.1, 0.5)  # even with half the weight
    out = reduce_tensors(Reduce(ReduceKind.CLIPPED_MEAN, clip=clip), tensors, w, torch.float64)
    median = torch.stack([t.double() for t in tensors]).sort(dim=0).values[2:4].mean(dim=0)
    assert float((out - median).norm()) <= clip * (1 + 1e-9)
    mean = reduce_tensors(Reduce(), tensors, w, torch.float64)
    assert float((mean - median).norm()) > 1e6  # what the outlier does to the plain mean


def test_multi_krum_by_hand() -> None:
    """Sources a (1, 0), b (1.1, 0), c (0.9, 0), d (1, 0.1) and e (−5, 0), weights 0.1, 0.2, 0.3,
    0.2, 0.2, trim 0.2: f = 1, each scored on its 5 − 1 − 2 = 2 nearest. Squared distances: a–b,
    a–c, a–d 0.01, b–c 0.04, b–d and c–d 0.02, a–e 36, b–e 37.21, c–e 34.81, d–e 36.01. Scores:
    a 0.02, b 0.03, c 0.03, d 0.03, e 34.81 + 36 = 70.81, so e is dropped and a–d averaged with
    weights 0.125, 0.25, 0.375, 0.25: (0.9875, 0.025)."""
    from fedmoe.aggregate.reduce import multi_krum_keep

    points = ([1.0, 0.0], [1.1, 0.0], [0.9, 0.0], [1.0, 0.1], [-5.0, 0.0])
    tensors = [torch.tensor(v, dtype=torch.float64) for v in points]
    w = (0.1, 0.2, 0.3, 0.2, 0.2)
    assert multi_krum_keep(torch.stack(tensors), 1) == [0, 1, 2, 3]
    # f = 2 drops e and one of b, c, d (scores 0.03); with krum_ratio 2 only scores above twice
    # the median score (0.03) go: e alone
    assert len(multi_krum_keep(torch.stack(tensors), 2)) == 3
    assert multi_krum_keep(torch.stack(tensors), 2, 2.0) == [0, 1, 2, 3]
    assert multi_krum_keep(torch.stack(tensors), 2, 1e4) == [0, 1, 2, 3, 4]  # 70.81 < 300
    out = reduce_tensors(Reduce(ReduceKind.MULTI_KRUM, trim=0.2), tensors, w, torch.float64)
    assert out.tolist() == pytest.approx([0.9875, 0.025], abs=1e-12)
    # ⌊0.1 · 5⌋ = 0 dropped: the weighted mean
    plain = reduce_tensors(Reduce(ReduceKind.MULTI_KRUM, trim=0.1), tensors, w, torch.float64)
    assert plain.tolist() == pytest.approx(reduce_tensors(Reduce(), tensors, w, torch.float64)
                                           .tolist(), abs=1e-12)  # fmt: skip


def test_multi_krum_drops_flipped_updates_of_a_shared_direction() -> None:
    """16 honest updates along a common direction with noise, 4 flipped (θ0 − Δ): with trim 0.2
    every flipped source is dropped, so the result is the honest sources' weighted mean."""
    g = torch.Generator().manual_seed(3)
    start = torch.randn(50, generator=g, dtype=torch.float64)
    common = torch.randn(50, generator=g, dtype=torch.float64)
    honest = [start + common + 0.3 * torch.randn(50, generator=g, dtype=torch.float64)
              for _ in range(16)]  # fmt: skip
    flipped = [start - (h - start) for h in honest[:4]]
    tensors = honest + flipped
    w = (0.05,) * 20
    out = reduce_tensors(Reduce(ReduceKind.MULTI_KRUM, trim=0.2), tensors, w, torch.float64)
    assert torch.allclose(out, torch.stack(honest).mean(dim=0), atol=1e-12)


# ---------------------------------------------------------------------------------------------
# the baselines by hand (everyone takes part)


def test_fedavg_is_the_sample_weighted_average(states: dict[int, State]) -> None:
    before = copy(states)
    spec = FedAvg().spec(round_inputs())
    w = (10 / 60, 30 / 60, 20 / 60)
    group = Group(CLIENTS, CLIENTS, w)
    experts = SameIndex((ExpertGroup(CLIENTS, CLIENTS, (w, w, w)),))  # expert j with expert j
    assert spec == MergeSpec("fedavg", CLIENTS, (group,), (group,), (experts,), Reduce())
    out = merge_states(spec, SCHEMA, states)
    assert unchanged(before, states)  # inputs are not modified
    assert list(out) == list(CLIENTS)
    for name in states[0]:
        # (n0·x0 + n1·x1 + n2·x2) / (n0 + n1 + n2)
        expected = (
            10 * states[0][name].double()
            + 30 * states[3][name].double()
            + 20 * states[7][name].double()
        ) / 60
        assert close(out[0][name], expected), name
        assert out[3][name] is out[0][name] and out[7][name] is out[0][name]  # computed once


def test_local_is_the_identity(states: dict[int, State]) -> None:
    spec = Local().spec(round_inputs())
    assert (spec.shared, spec.gate, spec.experts) == ((), (), (None,))
    out = merge_states(spec, SCHEMA, states)
    assert out.keys() == set(CLIENTS)
    assert all(torch.equal(out[c][k], states[c][k]) for c in CLIENTS for k in states[c])


def test_naive_moe_weights_expert_j_by_routed_counts(states: dict[int, State]) -> None:
    routing: dict[int, dict[str, Any]] = {
        0: {"num_samples": 10, "layers": [{"topk_count": [10, 0, 5]}]},  # fedmoe-moe/2 form
        3: {"topk_count": [30, 0, 5]},  # the single-layer fedmoe-moe/1 form
    }  # client 7: no statistics
    spec = NaiveMoE().spec(round_inputs(routing=routing))
    # client 7 falls back to its sample count (20) for every expert
    per_expert = [
        {0: 10 / 60, 3: 30 / 60, 7: 20 / 60},
        {0: 0.0, 3: 0.0, 7: 1.0},
        {0: 5 / 30, 3: 5 / 30, 7: 20 / 30},
    ]
    merge = spec.experts[0]
    assert isinstance(merge, SameIndex)
    (group,) = merge.groups
    assert np.allclose(group.weights, [[w[c] for c in CLIENTS] for w in per_expert], atol=1e-15)
    out = merge_states(spec, SCHEMA, states)
    for c in CLIENTS:
        for name in EXPERT_NAMES:
            for j, w in enumerate(per_expert):
                assert close(out[c][name][j], average(states, name, w)[j]), (c, name, j)
        for name in ("embed.fc1.weight", "gate.weight"):  # shared parts: by sample counts
            assert close(out[c][name], average(states, name, {k: SAMPLES[k] / 60 for k in CLIENTS}))


def test_naive_moe_expert_nobody_routes_to_is_a_plain_mean(states: dict[int, State]) -> None:
    routing = {c: {"topk_count": [1, 0, 2]} for c in CLIENTS}
    out = merge_states(NaiveMoE().spec(round_inputs(routing=routing)), SCHEMA, states)
    # every client routed the same counts: expert 1 (nobody) and expert 0 are plain means
    mean = average(states, "experts.w1", dict.fromkeys(CLIENTS, 1 / 3))
    assert close(out[3]["experts.w1"][1], mean[1])
    assert close(out[3]["experts.w1"][0], mean[0])


def test_naive_moe_differs_from_fedavg(states: dict[int, State]) -> None:
    routing = {0: {"topk_count": [10, 0, 5]}, 3: {"topk_count": [30, 0, 5]}}
    a = merge_states(NaiveMoE().spec(round_inputs(routing=routing)), SCHEMA, states)
    b = merge_states(FedAvg().spec(round_inputs(routing=routing)), SCHEMA, states)
    assert torch.equal(a[0]["embed.fc1.weight"], b[0]["embed.fc1.weight"])
    assert torch.equal(a[0]["experts.w1"][0], b[0]["experts.w1"][0])  # loads ∝ samples here
    assert not torch.equal(a[0]["experts.w1"][2], b[0]["experts.w1"][2])


def test_oracle_domain_averages_within_groups_only(states: dict[int, State]) -> None:
    spec = OracleDomain().spec(round_inputs())
    assert spec.shared == (Group((3,), (3,), (1.0,)), Group((0, 7), (0, 7), (1 / 3, 2 / 3)))
    out = merge_states(spec, SCHEMA, states)
    # group 1 = clients 0 and 7 (10 and 20 samples); group 0 = client 3 alone
    for name in states[0]:
        expected = (10 * states[0][name].double() + 20 * states[7][name].double()) / 30
        assert close(out[0][name], expected) and out[7][name] is out[0][name]
        assert torch.equal(out[3][name], states[3][name])
    with pytest.raises(UsageError, match=r"needs each client's true domain group \(client 3 has"):
        OracleDomain().spec(round_inputs(groups={0: 1, 7: 1}))


# ---------------------------------------------------------------------------------------------
# partial participation: clients 0 and 7 train, client 3 sits the round out

PRESENT = (0, 7)


@pytest.mark.parametrize("name", ["fedavg", "naive-moe"])
def test_global_methods_give_every_client_the_participants_mean(
    states: dict[int, State], name: str
) -> None:
    spec = AGGREGATORS[name]().spec(round_inputs(PRESENT))
    group = Group(CLIENTS, PRESENT, (1 / 3, 2 / 3))  # 10 and 20 samples; 3 is a member only
    assert spec.clients == CLIENTS and spec.shared == (group,) and spec.gate == (group,)
    out = merge_states(spec, SCHEMA, states)
    for name_ in states[0]:
        # (10·x0 + 20·x7) / 30, and client 3's own model plays no part
        expected = (10 * states[0][name_].double() + 20 * states[7][name_].double()) / 30
        assert close(out[3][name_], expected), name_
        assert out[0][name_] is out[3][name_] and out[7][name_] is out[3][name_]


def test_oracle_domain_under_partial_participation(states: dict[int, State]) -> None:
    # 0 and 7 take part: their group averages, client 3's group has no participant and keeps
    spec = OracleDomain().spec(round_inputs(PRESENT))
    assert spec.shared == (Group((0, 7), (0, 7), (1 / 3, 2 / 3)),)
    out = merge_states(spec, SCHEMA, states)
    for name in states[0]:
        expected = (10 * states[0][name].double() + 20 * states[7][name].double()) / 30
        assert close(out[7][name], expected) and out[0][name] is out[7][name]
        assert torch.equal(out[3][name], states[3][name])
    # 0 and 3 take part: client 7, absent, receives its group's new model (client 0's alone)
    spec = OracleDomain().spec(round_inputs((0, 3)))
    assert spec.shared == (Group((3,), (3,), (1.0,)), Group((0, 7), (0,), (1.0,)))
    out = merge_states(spec, SCHEMA, states)
    for name in states[0]:
        assert torch.equal(out[7][name], states[0][name]) and out[0][name] is out[7][name]
        assert torch.equal(out[3][name], states[3][name])


# ---------------------------------------------------------------------------------------------
# robust reduce kinds through the methods


def test_reduce_parameters_reach_the_spec() -> None:
    for name in ("fedavg", "naive-moe", "oracle-domain", "fedmoe-da"):
        agg = make_method(name, {"reduce": "clipped-mean", "clip": 0.5, "trim": 0.2})
        inputs = round_inputs(matrices=(identity_matrix(ExpertIndex(CLIENTS, 3)),), matrix_round=1)
        assert agg.spec(inputs).reduce == Reduce(ReduceKind.CLIPPED_MEAN, 0.2, 0.5), name
    assert Local().spec(round_inputs()).reduce == Reduce()


def test_fedavg_median_is_the_coordinate_wise_median_of_every_tensor(
    states: dict[int, State],
) -> None:
    out = merge_states(make_method("fedavg", {"reduce": "median"}).spec(round_inputs()), SCHEMA,
                       states)  # fmt: skip
    for name in states[0]:
        stacked = torch.stack([states[c][name] for c in CLIENTS])  # (3, ...)
        assert torch.equal(out[0][name], stacked.median(dim=0).values), name
        assert out[3][name] is out[0][name] and out[7][name] is out[0][name]
    # not the weighted mean
    mean = merge_states(FedAvg().spec(round_inputs()), SCHEMA, states)
    assert not torch.equal(out[0]["gate.weight"], mean[0]["gate.weight"])


# ---------------------------------------------------------------------------------------------
# FedMoE-DA: Eq. 11 over the applied rows

# target (client, expert) → [(source client, source expert, weight)]
EQ11: Rows = {
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
# the rows applied when only 0 and 7 take part: client 3's sources dropped, renormalised
EQ11_PRESENT: Rows = {
    (0, 0): [(0, 0, 0.5 / 0.7), (7, 1, 0.2 / 0.7)],  # 5/7 and 2/7
    (0, 1): [(0, 1, 0.6), (0, 2, 0.4)],
    (0, 2): [(0, 2, 1.0)],
    (7, 0): [(7, 0, 1.0)],
    (7, 1): [(7, 1, 1.0)],  # 0.55 / 0.55
    (7, 2): [(7, 2, 0.25), (7, 0, 0.75)],  # 0.125 / 0.5 and 0.375 / 0.5
}


def eq11(
    states: dict[int, State], name: str, sources: list[tuple[int, int, float]]
) -> torch.Tensor:
    """θ_ij = Σ a_(ij),(i'j') θ_i'j', in float64 by hand."""
    return wsum(w * states[sc][name][sj].double() for sc, sj, w in sources)


def da_inputs(participants: tuple[int, ...] = CLIENTS, **kw: Any) -> RoundInputs:
    kw.setdefault("matrices", (hand_matrix(EQ11, CLIENTS),))
    kw.setdefault("matrix_round", kw.get("round_", 1))
    return round_inputs(participants, **kw)


@pytest.mark.parametrize("gate", ["per-client", "shared"])
def test_fedmoe_da_reproduces_eq_11(states: dict[int, State], gate: str) -> None:
    before = copy(states)
    spec = FedMoEDA(gate=GateMode(gate)).spec(da_inputs())
    assert spec.method == "fedmoe-da" and spec.gate == (spec.shared if gate == "shared" else ())
    assert isinstance(spec.experts[0], CrossExpert)
    out = merge_states(spec, SCHEMA, states)
    assert unchanged(before, states)
    for (c, j), sources in EQ11.items():
        for name in EXPERT_NAMES:
            assert close(out[c][name][j], eq11(states, name, sources)), (c, j, name)
    fed = {c: SAMPLES[c] / 60 for c in CLIENTS}
    for c in CLIENTS:
        for name in SHARED_NAMES:
            assert close(out[c][name], average(states, name, fed))
        if gate == "shared":
            assert close(out[c]["gate.weight"], average(states, "gate.weight", fed))
        else:
            assert torch.equal(out[c]["gate.weight"], states[c]["gate.weight"])
        assert out[c].keys() == states[c].keys()
        assert all(out[c][k].dtype == torch.float32 for k in out[c])


@pytest.mark.parametrize(("wire", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_fedmoe_da_wire_rounds_remote_sources_only(
    states: dict[int, State], wire: str, dtype: torch.dtype
) -> None:
    """wire bf16 / fp16: a source from another client is rounded to the wire's precision before
    the float64 merge; the target's own experts (its own index or another of its experts) are not;
    a row of the target's own experts alone is exactly what it was."""
    spec = FedMoEDA(wire=Wire(wire)).spec(da_inputs())
    out = merge_states(spec, SCHEMA, states)
    native = merge_states(FedMoEDA().spec(da_inputs()), SCHEMA, states)

    def on_wire(sc: int, tc: int, t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype).double() if sc != tc else t.double()

    for (c, j), sources in EQ11.items():
        for name in EXPERT_NAMES:
            exact = wsum(w * on_wire(sc, c, states[sc][name][sj]) for sc, sj, w in sources)
            assert torch.equal(out[c][name][j], exact.to(torch.float32)), (c, j, name)
            if all(sc == c for sc, _, _ in sources):  # nothing travelled
                assert torch.equal(out[c][name][j], native[c][name][j])
            else:
                assert not torch.equal(out[c][name][j], native[c][name][j])
    for name in SHARED_NAMES:  # the server's parts are not the wire's business
        assert torch.equal(out[0][name], native[0][name])


def test_wire_halves_the_peer_to_peer_bytes_of_the_ledger() -> None:
    """The sync plan counts a transfer at the wire's bytes per value: 2 for bf16 against the 4 of
    float32 experts, so p2p bytes halve; sizes from a manifest that predates value counts cannot
    price a reduced wire and say how to fix it."""
    matrices = (hand_matrix(EQ11, CLIENTS),)
    sizes = SCHEMA.sizes()
    assert sizes.expert_values[0] * 4 == sizes.expert[0]
    native = plan_sync(matrices, 1, 1, CLIENTS, FedMoEDA(), sizes)
    half = plan_sync(matrices, 1, 1, CLIENTS, FedMoEDA(wire=Wire.BF16), sizes)
    assert native.ledger.p2p > 0 and half.ledger.p2p * 2 == native.ledger.p2p
    assert half.ledger.server_up == native.ledger.server_up
    assert list(half.transfers.bytes * 2) == list(native.transfers.bytes)
    old = PartSizes.from_dict({k: v for k, v in sizes.to_dict().items() if k != "expert_values"})
    assert old.expert_values == () and old.expert == sizes.expert
    with pytest.raises(InputError, match="predate per-expert value counts") as caught:
        plan_sync(matrices, 1, 1, CLIENTS, FedMoEDA(wire=Wire.BF16), old)
    assert "re-run fedmoe affinity" in (caught.value.hint or "")
    assert plan_sync(matrices, 1, 1, CLIENTS, FedMoEDA(), old).ledger == native.ledger


def test_fedmoe_da_shared_affinity_averages_with_the_clients_the_experts_draw_on(
    states: dict[int, State],
) -> None:
    spec = FedMoEDA(shared=SharedMix.AFFINITY).spec(da_inputs())
    # client weights = the mean over the client's 3 rows of EQ11 of each client's share, by hand
    mix = {
        0: {0: (0.5 + 1.0 + 1.0) / 3, 3: 0.3 / 3, 7: 0.2 / 3},
        3: {0: (0.25 + 0.3) / 3, 3: (0.25 + 0.1 + 0.7) / 3, 7: (0.5 + 0.9) / 3},
        7: {3: (0.45 + 0.5) / 3, 7: (1.0 + 0.55 + 0.5) / 3},
    }
    assert [g.members for g in spec.shared] == [(0,), (3,), (7,)] and spec.gate == ()
    for g in spec.shared:
        assert dict(zip(g.sources, g.weights, strict=True)) == pytest.approx(mix[g.members[0]])
    out = merge_states(spec, SCHEMA, states)
    for c in CLIENTS:
        for name in SHARED_NAMES:
            assert close(out[c][name], average(states, name, mix[c])), (c, name)
        for (t, j), sources in EQ11.items():  # the experts are Eq. 11 as before
            if t == c:
                assert close(out[c]["experts.w1"][j], eq11(states, "experts.w1", sources))
    # a client that sat the round out keeps its shared parts
    part = merge_states(FedMoEDA(shared=SharedMix.AFFINITY).spec(da_inputs(PRESENT)), SCHEMA,
                        states)  # fmt: skip
    absent = next(c for c in CLIENTS if c not in PRESENT)
    assert all(torch.equal(part[absent][n], states[absent][n]) for n in SHARED_NAMES)


def test_fedmoe_da_under_partial_participation(states: dict[int, State]) -> None:
    spec = FedMoEDA().spec(da_inputs(PRESENT))
    assert spec.clients == CLIENTS and spec.gate == ()
    assert spec.shared == (Group(CLIENTS, PRESENT, (1 / 3, 2 / 3)),)
    (cross,) = spec.experts
    assert isinstance(cross, CrossExpert) and cross.matrix.index == ExpertIndex(PRESENT, 3)
    out = merge_states(spec, SCHEMA, states)
    for (c, j), sources in EQ11_PRESENT.items():
        for name in EXPERT_NAMES:
            assert close(out[c][name][j], eq11(states, name, sources)), (c, j, name)
    # client 3 sat out: its experts and own gate stay, the new shared parts reach it
    for name in (*EXPERT_NAMES, "gate.weight"):
        assert torch.equal(out[3][name], states[3][name]), name
    for name in SHARED_NAMES:
        assert close(out[3][name], fedavg_by_hand(states, name, PRESENT))
        assert out[0][name] is out[3][name] and out[7][name] is out[3][name]
    for c in PRESENT:
        assert torch.equal(out[c]["gate.weight"], states[c]["gate.weight"])


def test_fedmoe_da_shared_gate_reaches_the_absent_client(states: dict[int, State]) -> None:
    spec = FedMoEDA(gate=GateMode.SHARED).spec(da_inputs(PRESENT))
    out = merge_states(spec, SCHEMA, states)
    expected = fedavg_by_hand(states, "gate.weight", PRESENT)
    for c in CLIENTS:
        assert close(out[c]["gate.weight"], expected)
    assert all(torch.equal(out[3][n], states[3][n]) for n in EXPERT_NAMES)


@pytest.mark.parametrize(
    ("interval", "matrix_round", "merges"),
    [("matrix", 2, True), ("matrix", 1, True), ("sync", 2, True), ("sync", 1, False)],
)
def test_fedmoe_da_sync_interval_merges_experts_only_on_refresh(
    states: dict[int, State], interval: str, matrix_round: int, merges: bool
) -> None:
    """Round 2 with A from round ``matrix_round``: ``interval: sync`` merges experts only when A
    is fresh; the shared parts are averaged every round."""
    agg = FedMoEDA(interval=Interval(interval), refresh_interval=2)
    spec = agg.spec(da_inputs(round_=2, matrix_round=matrix_round))
    assert (spec.experts[0] is not None) == merges
    out = merge_states(spec, SCHEMA, states)
    for (c, j), sources in EQ11.items():
        expected = eq11(states, "experts.w1", sources) if merges else states[c]["experts.w1"][j]
        assert close(out[c]["experts.w1"][j], expected), (c, j)
    for c in CLIENTS:
        assert close(
            out[c]["embed.fc1.weight"], fedavg_by_hand(states, "embed.fc1.weight", CLIENTS)
        )


def test_fedmoe_da_needs_one_matrix_per_moe_layer() -> None:
    with pytest.raises(
        InputError, match="fedmoe-da needs the round's aggregation matrices"
    ) as info:
        FedMoEDA().spec(round_inputs())
    assert info.value.hint == "build them with fedmoe plan-sync and pass --plan"
    two = (hand_matrix(EQ11, CLIENTS),) * 2
    with pytest.raises(InputError, match="the sync plan has 2 matrices for a model with 1 MoE"):
        FedMoEDA().spec(da_inputs(matrices=two))


def test_fedmoe_da_gives_a_participant_the_matrix_does_not_cover_identity_rows(
    states: dict[int, State],
) -> None:
    """A covers 0 and 7 only (3 had not uploaded when it was built): this round 3 takes part and
    keeps its experts; the others' rows apply over the present sources."""
    spec = FedMoEDA().spec(da_inputs(matrices=(hand_matrix(EQ11_PRESENT, PRESENT),)))
    out = merge_states(spec, SCHEMA, states)
    for name in EXPERT_NAMES:
        assert torch.equal(out[3][name], states[3][name])
        for (c, j), sources in EQ11_PRESENT.items():
            assert close(out[c][name][j], eq11(states, name, sources))
    assert close(out[3]["embed.fc2.weight"], fedavg_by_hand(states, "embed.fc2.weight", CLIENTS))


def test_fedmoe_da_keeps_an_expert_whose_sources_all_sat_out(states: dict[int, State]) -> None:
    """A plan row (0,0) ← (3,2) only (rows of a plan file need not name the target itself);
    client 3 sits the round out, so no source of that row is present: (0,0) keeps its expert."""
    rows = {**EQ11, (0, 0): [(3, 2, 1.0)]}
    out = merge_states(FedMoEDA().spec(da_inputs(PRESENT, matrices=(hand_matrix(rows, CLIENTS),))),
                       SCHEMA, states)  # fmt: skip
    for name in EXPERT_NAMES:
        assert torch.equal(out[0][name][0], states[0][name][0]), name


# ---------------------------------------------------------------------------------------------
# several MoE layers


def test_each_moe_layer_follows_its_own_matrix() -> None:
    states = make_states(CFG2)
    schema = schema_for(CFG2)
    assert schema.num_layers == 2
    ident = identity_matrix(ExpertIndex(CLIENTS, 3))
    spec = FedMoEDA().spec(da_inputs(schema=schema, matrices=(hand_matrix(EQ11, CLIENTS), ident)))
    out = merge_states(spec, schema, states)
    for c in CLIENTS:
        for name in EXPERT_NAMES:  # layer 1 (the classifying one): A = I, nothing moves
            assert torch.equal(out[c][name], states[c][name])
        for name in ("blocks.0.gate.weight", "gate.weight"):  # per-client gates
            assert torch.equal(out[c][name], states[c][name])
        assert close(out[c]["embed.fc1.bias"], fedavg_by_hand(states, "embed.fc1.bias", CLIENTS))
    for (c, j), sources in EQ11.items():  # layer 0: Eq. 11 by hand
        for name in ("blocks.0.experts.w1", "blocks.0.experts.b2"):
            assert close(out[c][name][j], eq11(states, name, sources)), (c, j, name)
    # FedAvg averages every layer's gate and experts alike
    avg = merge_states(FedAvg().spec(round_inputs(PRESENT, schema=schema)), schema, states)
    for name in states[0]:
        assert close(avg[3][name], fedavg_by_hand(states, name, PRESENT)), name


# ---------------------------------------------------------------------------------------------
# invariants of every method


def all_specs(inputs: RoundInputs) -> list[tuple[str, MergeSpec]]:
    """Every method's spec (FedMoE-DA with the hand matrix and a planned one; both gate modes;
    every reduce kind of FedAvg)."""
    x = torch.randn(9, 4, generator=torch.Generator().manual_seed(0))
    planned = aggregation_matrix(topk_cosine(x, 9), ExpertIndex(CLIENTS, 3), 8, 0.3)
    da = dataclasses.replace(inputs, matrix_round=inputs.round)
    out = [(name, AGGREGATORS[name]().spec(inputs)) for name in AGGREGATORS if name != "fedmoe-da"]
    out += [("fedavg-" + k.value, FedAvg(reduce=k).spec(inputs)) for k in ReduceKind]
    for gate in ("per-client", "shared"):
        for matrix in (hand_matrix(EQ11, CLIENTS), planned):
            agg = FedMoEDA(gate=GateMode(gate))
            spec = agg.spec(dataclasses.replace(da, matrices=(matrix,)))
            out.append((f"fedmoe-da-{gate}", spec))
    for label, defended in (
        ("outlier", FedMoEDA(expert_outlier=2.0)),
        ("bound", FedMoEDA(expert_bound=0.1)),
        ("trust", FedMoEDA(expert_trust=True)),
        (
            "aligned",
            FedMoEDA(expert_reduce=ReduceKind.ALIGNED_MEAN, reduce=ReduceKind.ALIGNED_MEAN),
        ),
        ("median", FedMoEDA(expert_reduce=ReduceKind.MEDIAN)),
    ):
        spec = defended.spec(dataclasses.replace(da, matrices=(planned,)))
        out.append((f"fedmoe-da-{label}", spec))
    return out


@pytest.mark.parametrize("participants", [CLIENTS, PRESENT, (3,)])
def test_identical_experts_merge_to_themselves(participants: tuple[int, ...]) -> None:
    """Every client holds the same model whose experts are all equal (Eq. 11 also mixes expert
    indices): whatever the method, weights and reduce kind, nothing changes."""
    same = state_of(init_model(CFG, 11))
    for name in EXPERT_NAMES:
        same[name] = same[name][:1].expand_as(same[name]).clone()
    states = {c: {k: v.clone() for k, v in same.items()} for c in CLIENTS}
    for label, spec in all_specs(round_inputs(participants, ROUTING)):
        out = merge_states(spec, SCHEMA, states, starts=states)  # no update: starts = models
        for c in CLIENTS:
            for k in same:
                assert torch.equal(out[c][k], same[k]), (label, c, k)


@pytest.mark.parametrize("participants", [CLIENTS, PRESENT])
def test_weights_sum_to_one(participants: tuple[int, ...]) -> None:
    for label, spec in all_specs(round_inputs(participants, ROUTING)):
        for group in (*spec.shared, *spec.gate):
            assert len(group.weights) == len(group.sources) and set(group.sources) <= set(
                participants
            )
            assert math.fsum(group.weights) == pytest.approx(1.0, abs=1e-12), label
        for merge in spec.experts:
            if isinstance(merge, SameIndex):
                for eg in merge.groups:
                    assert len(eg.weights) == 3
                    for row in eg.weights:
                        assert math.fsum(row) == pytest.approx(1.0, abs=1e-12), label
            elif isinstance(merge, CrossExpert):
                m = merge.matrix
                assert m.index.clients == participants
                sums = np.add.reduceat(m.weights, m.indptr[:-1])
                np.testing.assert_allclose(sums, 1.0, rtol=0, atol=1e-12, err_msg=label)


@pytest.mark.parametrize("name", list(AGGREGATORS))
def test_client_order_of_the_inputs_changes_nothing(states: dict[int, State], name: str) -> None:
    inputs = da_inputs(PRESENT, routing=ROUTING)
    agg = method(name)
    a = merge_states(agg.spec(inputs), SCHEMA, states)
    for order in ((7, 3, 0), (3, 7, 0)):
        shuffled = {c: dict(reversed(list(states[c].items()))) for c in order}
        reordered = dataclasses.replace(
            inputs,
            uploads={c: inputs.uploads[c] for c in reversed(PRESENT)},
            groups={c: GROUPS[c] for c in order},
        )
        b = merge_states(agg.spec(reordered), SCHEMA, shuffled)
        assert list(b) == list(CLIENTS)
        for c in CLIENTS:
            assert b[c].keys() == a[c].keys()
            assert all(torch.equal(a[c][k], b[c][k]) for k in a[c]), (name, c)


def test_half_precision_states_keep_their_dtype() -> None:
    states = {
        c: {k: v.to(torch.bfloat16) for k, v in s.items()} for c, s in make_states(CFG).items()
    }
    out = merge_states(FedAvg().spec(round_inputs()), SCHEMA, states)
    w = {c: SAMPLES[c] / 60 for c in CLIENTS}
    for k in states[0]:
        assert out[0][k].dtype == torch.bfloat16
        # accumulated in float64, rounded once
        assert torch.equal(out[0][k], average(states, k, w).to(torch.bfloat16))


# a declared layout with one tensor per expert (as Hugging Face stores Mixtral), and its stacked
# twin
PER_EXPERT = Layout(
    "toy-per-expert",
    (
        TensorRule("emb.{name}", Role.SHARED),
        TensorRule("moe.{layer}.gate", Role.GATE, proxy=True),
        TensorRule("moe.{layer}.e{expert}.w", Role.EXPERT),
    ),
)
STACKED = Layout(
    "toy-stacked",
    (
        TensorRule("emb.{name}", Role.SHARED),
        TensorRule("moe.{layer}.gate", Role.GATE, proxy=True),
        TensorRule("moe.{layer}.experts", Role.EXPERT, expert_axis=0),
    ),
)


@pytest.mark.parametrize("name", ["fedavg-median", "fedavg", "naive-moe", "fedmoe-da"])
def test_per_expert_layout_merges_like_the_stacked_one(name: str) -> None:
    g = torch.Generator().manual_seed(5)
    stacked = {
        c: {"emb.w": torch.randn(2, generator=g), "moe.0.gate": torch.randn(3, 2, generator=g),
            "moe.0.experts": torch.randn(3, 4, generator=g)}
        for c in CLIENTS
    }  # fmt: skip
    split = {
        c: {
            **{k: v for k, v in s.items() if k != "moe.0.experts"},
            **{f"moe.0.e{j}.w": s["moe.0.experts"][j].clone() for j in range(3)},
        }
        for c, s in stacked.items()
    }
    schemas = {
        "stacked": STACKED.resolve({k: v.shape for k, v in stacked[0].items()}),
        "split": PER_EXPERT.resolve({k: v.shape for k, v in split[0].items()}),
    }
    assert schemas["split"].num_experts == schemas["stacked"].num_experts == (3,)
    assert schemas["split"].sizes() == schemas["stacked"].sizes()
    agg = make_method("fedavg", {"reduce": "median"}) if name == "fedavg-median" else method(name)
    out = {}
    for kind, schema in schemas.items():
        inputs = da_inputs(PRESENT, routing=ROUTING, schema=schema)
        out[kind] = merge_states(agg.spec(inputs), schema, stacked if kind == "stacked" else split)
    for c in CLIENTS:
        for j in range(3):
            assert torch.equal(
                out["split"][c][f"moe.0.e{j}.w"], out["stacked"][c]["moe.0.experts"][j]
            )
        assert torch.equal(out["split"][c]["emb.w"], out["stacked"][c]["emb.w"])
    if name == "fedmoe-da":  # and the split merge is Eq. 11 by hand
        for (c, j), sources in EQ11_PRESENT.items():
            expected = wsum(w * split[sc][f"moe.0.e{sj}.w"].double() for sc, sj, w in sources)
            assert close(out["split"][c][f"moe.0.e{j}.w"], expected)


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
    assert "fedavg needs an integer num_samples metadata entry in every file" in clean_failure(r, 3)
    assert not (tmp_path / "g.safetensors").exists()
    # a negative count would become a negative weight (-10 and 30 → -0.5 and 1.5): refused
    write(tmp_path / "N.safetensors", files["A"], num_samples="-10")
    r = run_cli("aggregate", "N.safetensors", "B.safetensors", "--method", "fedavg",
                "--out", "g.safetensors")  # fmt: skip
    assert "N.safetensors: num_samples = -10 is not a sample count" in clean_failure(r, 3)
    assert not (tmp_path / "g.safetensors").exists()


def test_the_plain_merge_refuses_what_safetensors_refuses(
    files: dict[str, Any], tmp_path: Path, run_cli: Run
) -> None:
    """Non-string metadata values and overlapping tensor byte ranges are not safetensors: the
    plain merge refuses them like the reference reader does."""
    import struct

    def craft(path: Path, header: dict[str, Any], data: bytes) -> None:
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        path.write_bytes(struct.pack("<Q", len(text)) + text + data)

    blob = bytes(range(16))
    craft(tmp_path / "meta.safetensors",
          {"__metadata__": {"num_samples": 3}, "w": {"dtype": "F32", "shape": [4],
                                                    "data_offsets": [0, 16]}}, blob)  # fmt: skip
    craft(tmp_path / "overlap.safetensors",
          {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
           "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, blob)  # fmt: skip
    for name, message in (("meta", "__metadata__ must map strings to strings"),
                          ("overlap", "tensor b's byte range overlaps the tensor before it")):  # fmt: skip
        r = run_cli("aggregate", f"{name}.safetensors", f"{name}.safetensors", "--out",
                    "m.safetensors")  # fmt: skip
        assert message in clean_failure(r, 3)
        assert not (tmp_path / "m.safetensors").exists()


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
        (("--weights", "0.5"), 2, "--weights has 1 values for 2 inputs"),
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
