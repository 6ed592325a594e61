"""The sync-plan side of FedMoE-DA: the sparse aggregation matrix (Eq. 9–10) on hand-computed
cases, its restriction to a round's participants, the transfer list it implies (Eq. 11), the
traffic ledger and the byte sizes behind it; the round core over several MoE layers (affinity,
matrices, sync plan, any method's round plan) and the sync-plan file."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedmoe.affinity import ExpertIndex, Neighbours, Upload, compute_affinity, topk_cosine
from fedmoe.aggregate import (
    CrossExpert,
    FedAvg,
    FedMoEDA,
    GateMode,
    Interval,
    Local,
    Reduce,
    ReduceKind,
    RoundInputs,
    StaleProxies,
)
from fedmoe.errors import InputError, ParamError, UsageError
from fedmoe.io.atomic import OutputSet
from fedmoe.io.checkpoint import CheckpointMeta, open_checkpoint, save_checkpoint
from fedmoe.io.manifest import dumps, sha256_bytes
from fedmoe.io.plan_file import load_plan, plan_to_manifest
from fedmoe.model import MoEConfig, PartSizes, Role, init_model, schema_for, state_of
from fedmoe.plan import (
    AggregationMatrix,
    Ledger,
    Transfer,
    aggregation_matrix,
    client_prior,
    drop_small,
    identity_matrix,
    restrict,
    server_ledger,
    traffic_ledger,
    transfer_list,
)
from fedmoe.round import SyncPlan, build_matrices, held_uploads, plan_round, plan_sync


def neighbours(rows: list[list[tuple[int, float]]], k: int) -> Neighbours:
    """Hand-made neighbour rows [(column, similarity), ...], each sorted as topk_cosine sorts."""
    counts = [len(r) for r in rows]
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    indptr[1:] = np.cumsum(counts)
    return Neighbours(
        indptr,
        np.array([c for r in rows for c, _ in r], dtype=np.int64),
        np.array([v for r in rows for _, v in r], dtype=np.float32),
        k,
    )


def softmax(sims: list[float], tau: float) -> list[float]:
    """exp(r/τ) / Σ exp(r/τ), by hand."""
    e = [math.exp(r / tau) for r in sims]
    return [x / sum(e) for x in e]


def rows(matrix: AggregationMatrix) -> list[tuple[list[int], list[float]]]:
    return [
        (matrix.row(m)[0].tolist(), matrix.row(m)[1].tolist()) for m in range(matrix.index.size)
    ]


def check_rows_sum_to_one(matrix: AggregationMatrix) -> None:
    sums = np.add.reduceat(matrix.weights, matrix.indptr[:-1])
    np.testing.assert_allclose(sums, 1.0, rtol=0, atol=1e-12)
    assert matrix.weights.dtype == np.float64 and bool((matrix.weights > 0).all())


# ---------------------------------------------------------------------------------------------
# three clients, one expert each: proxies at 0°, 45° and 90°

R = math.sqrt(0.5)  # cos 45°


@pytest.fixture
def three() -> tuple[Neighbours, ExpertIndex]:
    """Proxies (1, 0), (1, 1), (0, 1): cosines 1/√2 between neighbours, 0 between the ends (the
    two 1/√2 of the middle row are bitwise equal: a tie)."""
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    return topk_cosine(x, 3), ExpertIndex((0, 1, 2), 1)


def test_three_clients_top_1(three: tuple[Neighbours, ExpertIndex]) -> None:
    nb, index = three
    a = aggregation_matrix(nb, index, top_p=1, tau=0.5)
    got = rows(a)
    # the middle client ties at 1/√2 with both others: both kept
    assert [src for src, _ in got] == [[0, 1], [1, 0, 2], [2, 1]]
    expected = [softmax([1, R], 0.5), softmax([1, R, R], 0.5), softmax([1, R], 0.5)]
    for (_, w), e in zip(got, expected, strict=True):
        np.testing.assert_allclose(w, e, rtol=0, atol=1e-6)
    # e.g. the first row: e² / (e² + e^√2)
    assert got[0][1][0] == pytest.approx(math.e**2 / (math.e**2 + math.exp(2 * R)), abs=1e-6)
    np.testing.assert_allclose(a.similarity, [1, R, 1, R, R, 1, R], atol=1e-6)
    assert a.targets.tolist() == [0, 0, 1, 1, 1, 2, 2]
    check_rows_sum_to_one(a)


def test_three_clients_everything_and_nothing(three: tuple[Neighbours, ExpertIndex]) -> None:
    nb, index = three
    for p in (2, 5):  # P ≥ M - 1: every client-expert is kept
        a = aggregation_matrix(nb, index, top_p=p, tau=0.25)
        got = rows(a)
        assert [src for src, _ in got] == [[0, 1, 2], [1, 0, 2], [2, 1, 0]]
        for (_, w), sims in zip(got, ([1, R, 0], [1, R, R], [1, R, 0]), strict=True):
            np.testing.assert_allclose(w, softmax(sims, 0.25), rtol=0, atol=1e-6)
    # P = 0: the identity
    a = aggregation_matrix(nb, index, top_p=0, tau=0.25)
    assert rows(a) == [([0], [1.0]), ([1], [1.0]), ([2], [1.0])]


def test_temperature_sharpens_and_flattens(three: tuple[Neighbours, ExpertIndex]) -> None:
    nb, index = three
    hot = aggregation_matrix(nb, index, 1, tau=100.0).row(1)[1]
    cold = aggregation_matrix(nb, index, 1, tau=0.01).row(1)[1]
    np.testing.assert_allclose(hot, 1 / 3, atol=1e-3)  # τ → ∞: uniform over the kept set
    assert cold[0] > 1 - 1e-10  # τ → 0: all weight on the most similar (itself)


# ---------------------------------------------------------------------------------------------
# three clients, two experts each: sources of other expert indices and of the client itself

# m = position·E + j:  0 = (0,0)  1 = (0,1)  2 = (1,0)  3 = (1,1)  4 = (2,0)  5 = (2,1)
HAND = [
    [(0, 1.0), (3, 0.75), (5, 0.75), (1, 0.5)],
    [(1, 1.0), (0, 0.5), (3, 0.5), (2, 0.25)],
    [(2, 1.0), (4, 0.75), (1, 0.25), (0, 0.0)],
    [(3, 1.0), (0, 0.75), (1, 0.5), (5, 0.25)],
    [(4, 1.0), (2, 0.75), (3, 0.0), (5, -0.5)],
    [(5, 1.0), (0, 0.75), (3, 0.5), (1, 0.0)],
]
INDEX6 = ExpertIndex((0, 1, 2), 2)


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [
        (1, [[0, 3, 5], [1, 0, 3], [2, 4], [3, 0], [4, 2], [5, 0]]),
        (2, [[0, 3, 5], [1, 0, 3], [2, 4, 1], [3, 0, 1], [4, 2, 3], [5, 0, 3]]),
        (3, [[0, 3, 5, 1], [1, 0, 3, 2], [2, 4, 1, 0], [3, 0, 1, 5], [4, 2, 3, 5], [5, 0, 3, 1]]),
    ],
)
def test_kept_set_is_the_p_plus_1_largest_with_ties(top_p: int, kept: list[list[int]]) -> None:
    a = aggregation_matrix(neighbours(HAND, 4), INDEX6, top_p, tau=0.25)
    got = rows(a)
    assert [src for src, _ in got] == kept
    for m, (src, w) in enumerate(got):
        sims = dict(HAND[m])
        np.testing.assert_allclose(w, softmax([sims[s] for s in src], 0.25), rtol=0, atol=1e-12)
        lo, hi = a.indptr[m], a.indptr[m + 1]
        np.testing.assert_array_equal(a.similarity[lo:hi], [sims[s] for s in src])
    check_rows_sum_to_one(a)


def test_hand_weights_top_1() -> None:
    a = aggregation_matrix(neighbours(HAND, 4), INDEX6, 1, tau=0.25)
    e4, e3, e2 = math.exp(4), math.exp(3), math.exp(2)  # r/τ for r = 1, 0.75, 0.5
    np.testing.assert_allclose(
        a.row(0)[1], [e4 / (e4 + 2 * e3), e3 / (e4 + 2 * e3), e3 / (e4 + 2 * e3)]
    )
    np.testing.assert_allclose(
        a.row(1)[1], [e4 / (e4 + 2 * e2), e2 / (e4 + 2 * e2), e2 / (e4 + 2 * e2)]
    )
    np.testing.assert_allclose(a.row(3)[1], [e4 / (e4 + e3), e3 / (e4 + e3)])


def test_p_zero_is_the_identity_even_with_ties_at_one() -> None:
    """Rows 0 and 1 are duplicates (cosine 1.0 with each other, row 0 listed first in both)."""
    tied = [
        [(0, 1.0), (1, 1.0), (2, 0.5)],
        [(0, 1.0), (1, 1.0), (2, 0.5)],
        [(2, 1.0), (0, 0.5), (1, 0.5)],
    ]
    index = ExpertIndex((4, 9, 11), 1)
    a = aggregation_matrix(neighbours(tied, 1), index, 0, tau=0.1)
    assert rows(a) == [([0], [1.0]), ([1], [1.0]), ([2], [1.0])]
    ident = identity_matrix(index)
    for field in ("indptr", "sources", "weights"):
        np.testing.assert_array_equal(getattr(a, field), getattr(ident, field))
    # with P = 1 the duplicates average each other with equal weights; row 2 keeps its tie
    b = aggregation_matrix(neighbours(tied, 2), index, 1, tau=0.1)
    assert [src for src, _ in rows(b)] == [[0, 1], [0, 1], [2, 0, 1]]
    np.testing.assert_allclose(b.row(0)[1], [0.5, 0.5])
    np.testing.assert_allclose(b.row(2)[1], softmax([1.0, 0.5, 0.5], 0.1), atol=1e-12)


def test_every_client_expert_kept_when_p_reaches_m_minus_1() -> None:
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(2))
    index = ExpertIndex((0, 1, 2, 3), 2)
    nb = topk_cosine(x, 8)
    u = x.double() / x.double().norm(dim=1, keepdim=True)
    full = (u @ u.T).numpy()
    for p in (7, 8, 30):
        a = aggregation_matrix(nb, index, p, tau=0.3)
        assert np.diff(a.indptr).tolist() == [8] * 8
        for m in range(8):
            src, w = a.row(m)
            assert sorted(src.tolist()) == list(range(8))
            sims = [1.0 if s == m else full[m, s] for s in src]
            np.testing.assert_allclose(w, softmax(sims, 0.3), rtol=0, atol=1e-6)
        check_rows_sum_to_one(a)


def test_too_few_candidates_and_bad_parameters() -> None:
    nb = neighbours(HAND, 4)
    with pytest.raises(ParamError) as info:
        aggregation_matrix(nb, INDEX6, 4, 0.1)
    assert info.value.key == "top_p" and isinstance(info.value, UsageError)
    assert info.value.as_option() == (
        "--top-p 4 needs 5 candidates per row but the affinity kept 4"
    )
    assert info.value.hint == "re-run fedmoe affinity with --candidates 5 or more"
    # with M = 6, P = 5 needs 6 and P = 9 also needs only M = 6
    full = neighbours([[*r, *[(c, -1.0) for c in range(6) if c not in dict(r)]] for r in HAND], 6)
    assert np.diff(aggregation_matrix(full, INDEX6, 9, 0.1).indptr).tolist() == [6] * 6
    for tau in (0.0, -1.0, float("nan")):
        with pytest.raises(ParamError) as info:
            aggregation_matrix(nb, INDEX6, 1, tau)
        assert info.value.as_option().startswith("--tau must be > 0, got ")
    with pytest.raises(ParamError) as info:
        aggregation_matrix(nb, INDEX6, -1, 0.1)
    assert info.value.as_option() == "--top-p must be >= 0, got -1"


def test_neighbours_are_not_modified() -> None:
    nb = neighbours(HAND, 4)
    copies = [t.copy() for t in (nb.indptr, nb.indices, nb.values)]
    aggregation_matrix(nb, INDEX6, 2, 0.25)
    for a, b in zip(copies, (nb.indptr, nb.indices, nb.values), strict=True):
        assert np.array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# the rows applied in a round: restrict to the participants


def test_restrict_keeps_present_sources_renormalised() -> None:
    """P = 2 over HAND; clients 0 and 2 take part. New numbering over (0, 2): 0 = (0,0),
    1 = (0,1), 2 = (2,0), 3 = (2,1). A softmax renormalised over a subset is the softmax over
    that subset."""
    a = aggregation_matrix(neighbours(HAND, 4), INDEX6, 2, tau=0.25)
    before = [x.copy() for x in (a.indptr, a.sources, a.weights, a.similarity)]
    r = restrict(a, (0, 2))
    assert r.index == ExpertIndex((0, 2), 2)
    got = rows(r)
    # old rows [0, 3, 5], [1, 0, 3], [4, 2, 3], [5, 0, 3]: client 1's experts (2, 3) dropped
    assert [src for src, _ in got] == [[0, 3], [1, 0], [2], [3, 0]]
    expected = [softmax([1, 0.75], 0.25), softmax([1, 0.5], 0.25), [1.0], softmax([1, 0.75], 0.25)]
    for (_, w), e in zip(got, expected, strict=True):
        np.testing.assert_allclose(w, e, rtol=0, atol=1e-12)
    e4, e3 = math.exp(4), math.exp(3)  # r/τ for r = 1 and 0.75
    assert got[0][1][1] == pytest.approx(e3 / (e4 + e3), abs=1e-12)
    np.testing.assert_array_equal(r.similarity, [1, 0.75, 1, 0.5, 1, 1, 0.75])
    check_rows_sum_to_one(r)
    for x, y in zip(before, (a.indptr, a.sources, a.weights, a.similarity), strict=True):
        np.testing.assert_array_equal(x, y)  # the full matrix is not modified
    # the order in which participants are named changes nothing
    other = restrict(a, [2, 0])
    for field in ("indptr", "sources", "weights", "similarity"):
        np.testing.assert_array_equal(getattr(other, field), getattr(r, field))


def test_client_prior_keeps_the_candidates_of_the_most_similar_clients() -> None:
    index = ExpertIndex((10, 11, 12), 2)  # ids, not positions
    nb = Neighbours(
        np.array([0, 3, 6, 8, 10, 11, 13]),
        np.array([0, 2, 4, 1, 5, 3, 2, 0, 3, 4, 4, 5, 1]),
        np.array([1, 0.9, 0.5, 1, 0.8, 0.2, 1, 0.9, 1, 0.7, 1, 1, 0.8], dtype=np.float32),
        3,
    )
    # client similarity = mean over its experts of the best candidate similarity, by hand:
    # 10→11 (0.9 + 0.2) / 2 = 0.55, 10→12 (0.5 + 0.8) / 2 = 0.65: client 10 keeps 12's experts;
    # 11→10 0.45 > 11→12 0.35: 11 keeps 10's; 12→10 0.4 (12→11: no candidate): 12 keeps 10's
    near = client_prior(nb, index, 1)
    got = [near.row(m)[0].tolist() for m in range(6)]
    assert got == [[0, 4], [1, 5], [2, 0], [3], [4], [5, 1]]
    assert near.row(5)[1].tolist() == pytest.approx([1.0, 0.8])
    assert client_prior(nb, index, 0) is nb
    assert [client_prior(nb, index, 2).row(m)[0].tolist() for m in range(6)] == [
        nb.row(m)[0].tolist() for m in range(6)
    ]  # every other client allowed: nothing dropped


def test_drop_small_removes_light_remote_sources_and_renormalises() -> None:
    index = ExpertIndex((0, 1), 2)
    # rows of (0,0), (0,1), (1,0), (1,1): target first, then its sources
    a = AggregationMatrix(
        index,
        np.array([0, 3, 5, 7, 8]),
        np.array([0, 2, 3, 1, 0, 2, 0, 3]),
        np.array([0.6, 0.3, 0.1, 0.04, 0.96, 0.5, 0.5, 1.0]),
        np.array([1, 0.9, 0.5, 0.2, 0.99, 1, 0.8, 1]),
    )
    d = drop_small(a, 0.2)
    # (0,0): the 0.1 source goes, 0.6 and 0.3 become 2/3 and 1/3; (0,1): its own entry (0.04)
    # stays though light, the 0.96 source too; (1,0) keeps both halves; (1,1) is itself
    np.testing.assert_array_equal(d.indptr, [0, 2, 4, 6, 7])
    np.testing.assert_array_equal(d.sources, [0, 2, 1, 0, 2, 0, 3])
    np.testing.assert_allclose(d.weights, [2 / 3, 1 / 3, 0.04, 0.96, 0.5, 0.5, 1.0], atol=1e-12)
    np.testing.assert_array_equal(d.similarity, [1, 0.9, 0.2, 0.99, 1, 0.8, 1])
    check_rows_sum_to_one(d)
    assert drop_small(a, 0.0) is a  # off: the paper's matrix itself
    # fewer remote sources, fewer peer-to-peer bytes
    assert sum(t.bytes for t in transfer_list(d, 100)) < sum(t.bytes for t in transfer_list(a, 100))


def test_restrict_to_everyone_and_to_one_client() -> None:
    a = aggregation_matrix(neighbours(HAND, 4), INDEX6, 3, tau=0.25)
    assert restrict(a, (0, 1, 2)) is a
    alone = restrict(a, (1,))
    assert alone.index == ExpertIndex((1,), 2)
    # client 1's rows [2, 4, 1, 0] and [3, 0, 1, 5] name none of its other experts: a lone
    # participant keeps its experts
    assert rows(alone) == [([0], [1.0]), ([1], [1.0])]
    assert transfer_list(alone, 10) == []


def test_restrict_gives_an_uncovered_client_identity_rows() -> None:
    a = aggregation_matrix(neighbours(HAND, 4), INDEX6, 1, tau=0.25)
    r = restrict(a, (9, 2, 0))  # client 9 had not uploaded when A was built
    assert r.index == ExpertIndex((0, 2, 9), 2)
    got = rows(r)
    # (0,0): [0, 3, 5] → [0, 3]; (0,1): [1, 0, 3] → [1, 0]; (2,0): [4, 2] → [2]; (2,1): [5, 0]
    assert [src for src, _ in got] == [[0, 3], [1, 0], [2], [3, 0], [4], [5]]
    assert got[4:] == [([4], [1.0]), ([5], [1.0])]
    check_rows_sum_to_one(r)
    assert transfer_list(r, 10) == [
        Transfer(0, 2, 0, (0,), 10),  # (2,1) ← (0,0)
        Transfer(2, 0, 0, (1,), 10),  # (0,0) ← (2,1)
    ]  # client 9 neither sends nor fetches


def test_restrict_never_leaves_an_empty_row() -> None:
    """A plan file may hold any rows summing to 1: here (0,0) ← (3,0) only. With client 3 absent
    the row has no present source; the target keeps its own expert, like an uncovered client."""
    index = ExpertIndex((0, 3, 7), 1)
    a = AggregationMatrix(
        index,
        np.array([0, 1, 2, 3]),
        np.array([1, 1, 2]),
        np.array([1.0, 1.0, 1.0]),
        np.full(3, np.nan),
    )
    r = restrict(a, (0, 7))
    assert rows(r) == [([0], [1.0]), ([1], [1.0])]
    check_rows_sum_to_one(r)


# ---------------------------------------------------------------------------------------------
# transfers and the ledger


def test_transfer_list_dedups_experts_per_pair() -> None:
    a = aggregation_matrix(neighbours(HAND, 4), INDEX6, 2, tau=0.25)
    got = transfer_list(a, expert_bytes=300)
    # client 0's experts 0 and 1 both use (1, 1): it is fetched once
    assert got == [
        Transfer(0, 1, 0, (0, 1), 600),
        Transfer(0, 2, 0, (0,), 300),
        Transfer(1, 0, 0, (1,), 300),
        Transfer(1, 2, 0, (0, 1), 600),
        Transfer(2, 0, 0, (1,), 300),
        Transfer(2, 1, 0, (0,), 300),
    ]
    # the MoE layer travels with each transfer
    assert [t.layer for t in transfer_list(a, 300, layer=2)] == [2] * 6
    # own experts never move; the identity moves nothing
    assert transfer_list(aggregation_matrix(neighbours(HAND, 4), INDEX6, 0, 0.25), 300) == []


def test_transfer_list_uses_client_ids_not_positions() -> None:
    index = ExpertIndex((10, 20), 1)
    a = aggregation_matrix(
        neighbours([[(0, 1.0), (1, 0.5)], [(1, 1.0), (0, 0.5)]], 2), index, 1, 1.0
    )
    assert transfer_list(a, 7) == [Transfer(10, 20, 0, (0,), 7), Transfer(20, 10, 0, (0,), 7)]


def test_part_sizes() -> None:
    sizes = PartSizes(shared=1000, gate=64, expert=(300,), num_experts=(2,))
    assert (sizes.experts, sizes.model, sizes.server_part) == (600, 1664, 1064)
    two = PartSizes(1000, 128, (300, 200), (2, 4))
    assert (two.experts, two.model, two.server_part) == (600 + 800, 2528, 1128)
    d = two.to_dict()
    assert d == {"shared": 1000, "gate": 128, "expert": [300, 200], "num_experts": [2, 4],
                 "model": 2528}  # fmt: skip
    assert PartSizes.from_dict(d) == two
    # schema 1 wrote the embedding as "embed" and one scalar expert size
    old = {"embed": 1000, "gate": 64, "expert": 300, "num_experts": 2, "model": 1664}
    assert PartSizes.from_dict(old) == sizes
    with pytest.raises(ValueError, match="expected a byte count"):
        PartSizes.from_dict({**d, "gate": -1})


def test_traffic_ledger_by_hand() -> None:
    sizes = PartSizes(shared=1000, gate=64, expert=(300,), num_experts=(2,))
    transfers = transfer_list(aggregation_matrix(neighbours(HAND, 4), INDEX6, 2, 0.25), 300)
    plan_bytes = {0: 11, 1: 22, 2: 33, 7: 1000}  # client 7 does not take part: not counted
    led = traffic_ledger(sizes, [0, 1, 2], transfers, plan_bytes, gate_shared=False)
    assert (led.clients, led.server_up, led.server_down, led.plan_down) == (3, 3192, 3000, 66)
    assert (led.p2p, led.max_client_p2p_in, led.fedavg_equivalent) == (2400, 900, 9984)
    assert led.server_total == 3192 + 3000 + 66
    d = led.to_dict()
    assert d["server_vs_fedavg"] == round(6258 / 9984, 6)
    assert d["total_vs_fedavg"] == round((6258 + 2400) / 9984, 6)
    assert set(d) == {
        "clients", "server_up", "server_down", "plan_down", "server_total", "p2p",
        "max_client_p2p_in", "fedavg_equivalent", "server_vs_fedavg", "total_vs_fedavg",
    }  # fmt: skip
    shared = traffic_ledger(sizes, [0, 1, 2], transfers, plan_bytes, gate_shared=True)
    assert shared.server_down == 3 * 1064
    empty = traffic_ledger(sizes, [0, 1, 2], [], {}, gate_shared=False)
    assert (empty.p2p, empty.max_client_p2p_in, empty.plan_down) == (0, 0, 0)


def test_server_ledger_by_hand() -> None:
    sizes = PartSizes(shared=1000, gate=64, expert=(300,), num_experts=(2,))
    # the whole model (1664 bytes) up and down for each of 3 participants
    every = frozenset(Role)
    assert server_ledger(sizes, 3, moves=every) == Ledger(3, 4992, 4992, 0, 0, 9984, 0)
    assert server_ledger(sizes, 3, moves=frozenset()) == Ledger(3, 0, 0, 0, 0, 9984, 0)
    assert server_ledger(sizes, 3, every).to_dict()["server_vs_fedavg"] == 1.0
    shared = server_ledger(sizes, 3, frozenset({Role.SHARED}))
    assert shared.server_up == shared.server_down == 3 * sizes.shared


# ---------------------------------------------------------------------------------------------
# byte sizes against real checkpoints


@pytest.mark.parametrize(
    "cfg",
    [
        MoEConfig((1, 8, 8), 10, embed_hidden=8, embed_dim=8, num_experts=4, expert_hidden=8),
        MoEConfig((5,), 3, embed_hidden=6, embed_dim=4, num_experts=3, top_k=1, expert_hidden=7,
                  gate_bias=True),
        MoEConfig((1, 8, 8), 10, embed="cnn", embed_hidden=4, embed_dim=8, num_experts=2,
                  expert_hidden=5),
        MoEConfig((5,), 3, embed_hidden=4, embed_dim=4, num_experts=3, expert_hidden=4,
                  gate_bias=True, moe_layers=3),
    ],
)  # fmt: skip
def test_part_sizes_equal_real_checkpoint_bytes(cfg: MoEConfig, tmp_path: Path) -> None:
    state = state_of(init_model(cfg, 0))
    path = tmp_path / "c.safetensors"
    with OutputSet() as outputs:
        save_checkpoint(outputs, path, state, CheckpointMeta(cfg, 0, 1, 5, 0, "train"))
    ck = open_checkpoint(path)
    schema = ck.schema
    assert schema == schema_for(cfg) and schema.num_layers == cfg.moe_layers
    assert schema.num_experts == (cfg.num_experts,) * cfg.moe_layers
    sizes = schema.sizes()
    by_role = {role: 0 for role in Role}
    for name in ck.names:
        by_role[schema.role(name)] += ck.tensor(name).nbytes
    assert (sizes.shared, sizes.gate) == (by_role[Role.SHARED], by_role[Role.GATE])
    assert sizes.num_experts == schema.num_experts
    for layer in range(cfg.moe_layers):
        experts = [e.name for e in schema.experts(layer)]
        assert sizes.expert[layer] * cfg.num_experts == sum(ck.tensor(n).nbytes for n in experts)
        for j in range(cfg.num_experts):  # one expert slice, read as the peers read it
            assert sum(ck.expert(n, j).nbytes for n in experts) == sizes.expert[layer]
    assert sizes.model == sum(t.nbytes for t in state.values())
    # the whole file is the header plus exactly those bytes
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert path.stat().st_size == 8 + header_len + sizes.model
    per_gate = 4 * cfg.num_experts * (cfg.embed_dim + 1)
    assert cfg.gate_bias == (sizes.gate == cfg.moe_layers * per_gate)


# ---------------------------------------------------------------------------------------------
# several MoE layers: affinity, matrices, the sync plan
#
# Three clients 0, 3, 7 with E = 3 and H = 4. Every proxy is a unit vector e_k, so a row's
# similarities are 1 (same e_k) or 0, and with P = 2 each target keeps exactly the three
# client-experts that share its direction, with weights 1/3.
# Layer 0 (blocks.0): client 0 = [e0, e1, e2], 3 = [e1, e2, e0], 7 = [e2, e0, e1] (rotated);
# layer 1 (the classifying gate): every client [e0, e1, e2].

CFG2 = MoEConfig((5,), 3, embed_hidden=4, embed_dim=4, num_experts=3, expert_hidden=4,
                 moe_layers=2)  # fmt: skip
CLIENTS = (0, 3, 7)
E = torch.eye(4)
ROTATED = {0: E[[0, 1, 2]], 3: E[[1, 2, 0]], 7: E[[2, 0, 1]]}
SAMPLES = {0: 10, 3: 30, 7: 20}
# expert j of client 0 at layer 0 shares its direction with (3, j - 1) and (7, j + 1) mod 3


def ml_uploads(round_: int = 1) -> dict[int, Upload]:
    routing = {
        0: {"num_samples": 10, "layers": [
            {"topk_count": [1, 2, 0], "by_label": [[1, 0, 0], [0, 2, 0], [0, 0, 0]]},
            {"topk_count": [0, 2, 1], "by_label": [[0, 0, 0], [1, 1, 0], [0, 0, 4]]},
        ]},
    }  # fmt: skip
    return {
        c: Upload(c, SAMPLES[c], round_, (ROTATED[c], E[:3].clone()), routing.get(c))
        for c in CLIENTS
    }


def test_schema_of_a_two_layer_model() -> None:
    schema = schema_for(CFG2)
    assert schema.num_layers == 2 and schema.num_experts == (3, 3)
    assert (schema.proxy(0), schema.proxy(1)) == ("blocks.0.gate.weight", "gate.weight")
    assert [e.name for e in schema.experts(0)] == [
        "blocks.0.experts.b1", "blocks.0.experts.b2", "blocks.0.experts.w1", "blocks.0.experts.w2",
    ]  # fmt: skip
    assert [e.name for e in schema.shared()] == [
        "embed.fc1.bias", "embed.fc1.weight", "embed.fc2.bias", "embed.fc2.weight",
    ]  # fmt: skip
    # embed: 4·5 + 4 + 4·4 + 4 = 44 values; gates 2·(3·4); experts of layer 0 map H → F → H:
    # 4·4 + 4 + 4·4 + 4 = 40 values, of layer 1 H → F → C: 4·4 + 4 + 4·3 + 3 = 35 values
    assert schema.sizes() == PartSizes(176, 96, (160, 140), (3, 3), (40, 35))  # float32: 4 bytes


def test_compute_affinity_gives_one_layer_affinity_per_layer() -> None:
    aff = compute_affinity(ml_uploads(), candidates=3, num_classes=3)
    assert [la.layer for la in aff.layers] == [0, 1]
    assert aff.clients == CLIENTS and (aff.round, aff.stale) == (1, ())
    for la in aff.layers:
        assert la.index == ExpertIndex(CLIENTS, 3)
    # m = position·3 + j: layer 0 row (0,0) = e0 meets (3,2) = m 5 and (7,1) = m 7
    cols, vals = aff.layers[0].neighbours.row(0)
    assert cols.tolist() == [0, 5, 7] and vals.tolist() == [1.0, 1.0, 1.0]
    assert aff.layers[1].neighbours.row(0)[0].tolist() == [0, 3, 6]  # (3,0) and (7,0)
    # routing statistics are read per layer (only client 0 has any)
    assert aff.layers[0].by_label[:3].tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 0]]
    assert aff.layers[1].by_label[:3].tolist() == [[0, 0, 0], [0.5, 0.5, 0], [0, 0, 1]]
    assert not aff.layers[0].by_label[3:].any() and not aff.layers[1].by_label[3:].any()


def test_compute_affinity_marks_stale_uploads() -> None:
    ups = ml_uploads(round_=4)
    ups[3] = dataclasses.replace(ups[3], round=2)  # client 3 sat rounds 3 and 4 out
    aff = compute_affinity(ups, candidates=3, num_classes=3)
    assert (aff.round, aff.stale, aff.clients) == (4, (3,), CLIENTS)
    with pytest.raises(InputError, match=r"different numbers of MoE layers: \[1, 2\]"):
        compute_affinity({**ups, 9: Upload(9, 1, 4, (E[:3],))}, 3, 3)


def test_held_uploads_keep_each_clients_latest() -> None:
    def up(c: int, r: int) -> Upload:
        return Upload(c, 1, r, (E[:3],))

    previous = {7: up(7, 1), 3: up(3, 1), 0: up(0, 3)}
    fresh = {0: up(0, 2), 7: up(7, 2)}
    held = held_uploads(previous, fresh, StaleProxies.KEEP)
    assert list(held) == [0, 3, 7]  # increasing ids
    assert {c: u.round for c, u in held.items()} == {0: 3, 3: 1, 7: 2}  # the later round wins
    assert previous[7].round == 1  # arguments not modified
    dropped = held_uploads(previous, fresh, StaleProxies.DROP)
    assert {c: u.round for c, u in dropped.items()} == {0: 2, 7: 2}


def ml_matrices() -> tuple[AggregationMatrix, ...]:
    return build_matrices(compute_affinity(ml_uploads(), 3, 3), top_p=2, tau=0.5)


def test_build_matrices_gives_one_matrix_per_layer() -> None:
    mats = ml_matrices()
    assert len(mats) == 2
    a0, a1 = mats
    assert rows(a0)[0] == ([0, 5, 7], pytest.approx([1 / 3] * 3))
    # m = 4 is (3,1): at layer 0 it is e2 like (0,2) = m 2 and (7,0) = m 6; at layer 1 it is e1
    # like (0,1) and (7,1). Ties at 1 are ordered by column.
    assert rows(a0)[4] == ([2, 4, 6], pytest.approx([1 / 3] * 3))
    assert rows(a1)[4] == ([1, 4, 7], pytest.approx([1 / 3] * 3))
    for a in mats:
        assert np.diff(a.indptr).tolist() == [3] * 9
        check_rows_sum_to_one(a)


SIZES2 = PartSizes(176, 96, (160, 140), (3, 3))  # schema_for(CFG2).sizes()
METHOD = FedMoEDA(top_p=2, candidates=3, tau=0.5)


def test_plan_sync_over_two_layers_by_hand() -> None:
    """Clients 0 and 7 take part: each fetches all three of the other's experts at each layer
    (480 = 3·160 bytes at layer 0, 420 = 3·140 at layer 1); client 3 is not contacted."""
    plan = plan_sync(ml_matrices(), 1, 1, [7, 0], METHOD, SIZES2)
    assert plan.participants == (0, 7) and plan.refreshed and plan.merges_experts
    assert tuple(plan.transfers) == (
        Transfer(0, 7, 0, (0, 1, 2), 480),
        Transfer(0, 7, 1, (0, 1, 2), 420),
        Transfer(7, 0, 0, (0, 1, 2), 480),
        Transfer(7, 0, 1, (0, 1, 2), 420),
    )
    led = plan.ledger
    assert led.p2p == sum(len(t.experts) * SIZES2.expert[t.layer] for t in plan.transfers) == 1800
    assert (led.clients, led.max_client_p2p_in) == (2, 900)
    assert (led.server_up, led.server_down) == (2 * (176 + 96), 2 * 176)  # gates per client
    assert led.fedavg_equivalent == 2 * 2 * (176 + 96 + 480 + 420)
    # each participant's rows as compact JSON: 2 layers × 3 experts × 2 sources of
    # "[l,j,c',j',0.5]" (13 characters), comma-separated in one list: 12·13 + 11 + 2 = 169
    assert led.plan_down == 2 * 169
    applied = plan.applied()
    assert [m.index for m in applied] == [ExpertIndex((0, 7), 3)] * 2
    assert rows(applied[0])[0] == ([0, 4], [0.5, 0.5])  # (0,0) ← (0,0), (7,1)
    assert plan.matrices[0].index.clients == CLIENTS  # the full matrices are kept


def test_plan_sync_with_everyone_and_a_shared_gate() -> None:
    method = FedMoEDA(top_p=2, candidates=3, gate=GateMode.SHARED)
    plan = plan_sync(ml_matrices(), 1, 1, CLIENTS, method, SIZES2)
    assert len(plan.transfers) == 12 and {t.experts for t in plan.transfers} == {(0, 1, 2)}
    assert plan.ledger.p2p == 6 * 480 + 6 * 420
    assert plan.ledger.server_down == 3 * (176 + 96)


def test_plan_sync_reusing_the_matrices() -> None:
    mats = ml_matrices()
    reuse = plan_sync(mats, 1, 2, (0, 7), METHOD, SIZES2)  # interval "matrix": merge every round
    assert not reuse.refreshed and reuse.merges_experts and reuse.ledger.p2p == 1800
    wait = plan_sync(mats, 1, 2, (0, 7), dataclasses.replace(METHOD, interval=Interval.SYNC),
                     SIZES2)  # fmt: skip
    assert not wait.refreshed and not wait.merges_experts
    assert len(wait.transfers) == 0 and (wait.ledger.p2p, wait.ledger.plan_down) == (0, 0)
    assert wait.ledger.server_up == 2 * 272  # the shared parts still travel
    fresh = plan_sync(mats, 2, 2, (0, 7), dataclasses.replace(METHOD, interval=Interval.SYNC),
                      SIZES2)  # fmt: skip
    assert fresh.refreshed and fresh.merges_experts and fresh.ledger.p2p == 1800


def test_plan_sync_refuses_bad_requests() -> None:
    with pytest.raises(InputError, match="the round has no participant to plan for"):
        plan_sync(ml_matrices(), 1, 1, (), METHOD, SIZES2)
    one_layer = PartSizes(176, 48, (140,), (3,))
    with pytest.raises(InputError, match="2 matrices for a model with 1 MoE layers"):
        plan_sync(ml_matrices(), 1, 1, (0,), METHOD, one_layer)


def test_refresh_due_every_i_rounds() -> None:
    m = FedMoEDA(refresh_interval=3)
    assert m.refresh_due(1, None)
    assert [m.refresh_due(r, 2) for r in (2, 3, 4, 5, 6)] == [False, False, False, True, True]


# ---------------------------------------------------------------------------------------------
# any method's round plan


def round_inputs(participants: tuple[int, ...]) -> RoundInputs:
    ups = ml_uploads()
    return RoundInputs(1, schema_for(CFG2), CLIENTS, {c: ups[c] for c in participants})


def test_plan_round_of_the_server_baselines() -> None:
    model = 176 + 96 + 480 + 420
    fed = plan_round(round_inputs((0, 7)), FedAvg())
    assert fed.sync is None and fed.spec.method == "fedavg"
    assert fed.ledger == Ledger(2, 2 * model, 2 * model, 0, 0, 4 * model, 0)
    local = plan_round(round_inputs((0, 7)), Local())
    assert local.ledger == Ledger(2, 0, 0, 0, 0, 4 * model, 0)


def test_plan_round_of_fedmoe_da_takes_the_sync_plan() -> None:
    sync = plan_sync(ml_matrices(), 1, 1, (0, 7), METHOD, SIZES2)
    rp = plan_round(round_inputs((0, 7)), METHOD, sync)
    assert rp.sync is sync and rp.ledger == sync.ledger
    assert len(rp.spec.experts) == 2
    for merge, applied in zip(rp.spec.experts, sync.applied(), strict=True):
        assert isinstance(merge, CrossExpert)
        for field in ("indptr", "sources", "weights"):
            np.testing.assert_array_equal(getattr(merge.matrix, field), getattr(applied, field))
    with pytest.raises(InputError, match="fedmoe-da needs the round's sync plan"):
        plan_round(round_inputs((0, 7)), METHOD)
    with pytest.raises(
        InputError,
        match=r"the sync plan is for clients \[0, 7\], the round's uploads are from clients "
        r"\[0, 3, 7\]",
    ):
        plan_round(round_inputs(CLIENTS), METHOD, sync)


# ---------------------------------------------------------------------------------------------
# the sync-plan file

# layer 0 of the saved plan: hand-made rows (no similarity behind them: null in the file)
HAND_ROWS = {
    (0, 0): [(0, 0, 0.5), (3, 2, 0.3), (7, 1, 0.2)],
    (0, 1): [(0, 1, 0.6), (0, 2, 0.4)],
    (0, 2): [(0, 2, 1.0)],
    (3, 0): [(3, 0, 0.25), (0, 0, 0.25), (7, 0, 0.25), (7, 2, 0.25)],
    (3, 1): [(7, 2, 0.9), (3, 1, 0.1)],
    (3, 2): [(3, 2, 0.7), (0, 1, 0.3)],
    (7, 0): [(7, 0, 1.0)],
    (7, 1): [(7, 1, 0.55), (3, 1, 0.45)],
    (7, 2): [(7, 2, 0.125), (7, 0, 0.375), (3, 0, 0.5)],
}


def hand_matrix(hand: dict[tuple[int, int], list[tuple[int, int, float]]]) -> AggregationMatrix:
    index = ExpertIndex(CLIENTS, 3)
    indptr, sources, weights = [0], [], []
    for m in range(index.size):
        for c, j, w in hand[index.key(m)]:
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


def same_matrix(a: AggregationMatrix, b: AggregationMatrix) -> None:
    assert a.index == b.index
    for field in ("indptr", "sources", "weights"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    np.testing.assert_array_equal(a.similarity, b.similarity)  # NaN where NaN


def test_plan_file_round_trip(tmp_path: Path) -> None:
    method = dataclasses.replace(
        METHOD,
        refresh_interval=2,
        gate=GateMode.SHARED,
        stale=StaleProxies.DROP,
        reduce=ReduceKind.TRIMMED_MEAN,
        trim=0.2,
    )  # parameters away from their defaults travel in "params"
    mats = (hand_matrix(HAND_ROWS), ml_matrices()[1])
    plan = plan_sync(mats, 3, 4, (0, 7), method, SIZES2)
    manifest = plan_to_manifest(plan, CFG2, SIZES2)
    assert (manifest["kind"], manifest["schema_version"]) == ("sync-plan", 2)
    assert (manifest["clients"], manifest["participants"]) == ([0, 3, 7], [0, 7])
    assert [layer["layer"] for layer in manifest["layers"]] == [0, 1]
    assert manifest["layers"][0]["targets"][0] == {
        "client": 0, "expert": 0, "sources": [
            {"client": 0, "expert": 0, "weight": 0.5, "similarity": None},
            {"client": 3, "expert": 2, "weight": 0.3, "similarity": None},
            {"client": 7, "expert": 1, "weight": 0.2, "similarity": None},
        ],
    }  # fmt: skip
    assert {t["layer"] for t in manifest["transfers"]} == {0, 1}
    assert manifest["params"]["reduce"] == "trimmed-mean" and manifest["params"]["trim"] == 0.2
    text = dumps(manifest)
    path = tmp_path / "plan.json"
    path.write_text(text, encoding="utf-8")
    loaded = load_plan(path)
    assert loaded.sha256 == sha256_bytes(text.encode("utf-8")) and loaded.where == str(path)
    got = loaded.plan
    assert len(got.matrices) == 2
    for a, b in zip(got.matrices, plan.matrices, strict=True):
        same_matrix(a, b)
    assert (got.round, got.matrix_round, got.participants) == (4, 3, (0, 7))
    assert got.method == method and got.method.reducer() == Reduce(ReduceKind.TRIMMED_MEAN, 0.2)
    assert got.transfers == plan.transfers and got.ledger == plan.ledger
    assert loaded.config == CFG2 and loaded.sizes == SIZES2


def schema_1_plan() -> dict[str, Any]:
    """A plan as fedmoe wrote it before several MoE layers (one layer, top-level targets)."""

    def src(c: int, j: int, w: float, sim: float | None) -> dict[str, Any]:
        return {"client": c, "expert": j, "weight": w, "similarity": sim}

    return {
        "schema_version": 1, "kind": "sync-plan", "fedmoe_version": "0.1.0",
        "round": 3, "matrix_round": 2, "refreshed": False,
        "top_p": 1, "tau": 0.5, "refresh_interval": 2, "gate": "shared",
        "affinity": None, "previous_plan": None,
        "model_config": {"input_shape": [5], "num_classes": 3, "embed": "mlp", "embed_hidden": 4,
                         "embed_dim": 4, "num_experts": 3, "top_k": 2, "expert_hidden": 4,
                         "gate_bias": False},
        "sizes": {"embed": 176, "gate": 48, "expert": 140, "num_experts": 3, "model": 644},
        "clients": [0, 3], "num_experts": 3,
        "targets": [
            {"client": 0, "expert": 0, "sources": [src(0, 0, 0.75, 1.0), src(3, 1, 0.25, 0.5)]},
            {"client": 0, "expert": 1, "sources": [src(0, 1, 1.0, 1.0)]},
            {"client": 0, "expert": 2, "sources": [src(0, 2, 1.0, 1.0)]},
            {"client": 3, "expert": 0, "sources": [src(3, 0, 1.0, 1.0)]},
            {"client": 3, "expert": 1, "sources": [src(3, 1, 0.5, 1.0), src(0, 0, 0.5, 0.5)]},
            {"client": 3, "expert": 2, "sources": [src(3, 2, 1.0, None)]},
        ],
        "transfers": [{"from": 0, "to": 3, "experts": [0], "bytes": 140},
                      {"from": 3, "to": 0, "experts": [1], "bytes": 140}],
        "ledger": {"clients": 2, "server_up": 448, "server_down": 448, "plan_down": 120,
                   "server_total": 1016, "p2p": 280, "fedavg_equivalent": 2576,
                   "max_client_p2p_in": 140},
    }  # fmt: skip


def test_schema_1_plan_loads_as_one_layer(tmp_path: Path) -> None:
    path = tmp_path / "old.json"
    path.write_text(dumps(schema_1_plan()), encoding="utf-8")
    loaded = load_plan(path)
    plan = loaded.plan
    (a,) = plan.matrices
    assert a.index == ExpertIndex((0, 3), 3)
    assert rows(a) == [([0, 4], [0.75, 0.25]), ([1], [1.0]), ([2], [1.0]), ([3], [1.0]),
                       ([4, 0], [0.5, 0.5]), ([5], [1.0])]  # fmt: skip
    np.testing.assert_array_equal(a.similarity, [1.0, 0.5, 1, 1, 1, 1, 0.5, np.nan])
    assert plan.participants == (0, 3)  # every client of a schema-1 plan took part
    assert (plan.round, plan.matrix_round, plan.refreshed) == (3, 2, False)
    assert plan.method == FedMoEDA(top_p=1, tau=0.5, refresh_interval=2, gate=GateMode.SHARED,
                                   candidates=16)  # fmt: skip
    assert tuple(plan.transfers) == (Transfer(0, 3, 0, (0,), 140), Transfer(3, 0, 0, (1,), 140))
    assert plan.ledger == Ledger(2, 448, 448, 120, 280, 2576, 140)
    assert loaded.sizes == PartSizes(176, 48, (140,), (3,))
    assert loaded.config == MoEConfig((5,), 3, embed_hidden=4, embed_dim=4, num_experts=3,
                                      expert_hidden=4)  # fmt: skip


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: p["targets"][1]["sources"][0].update(weight=0.9),
         "weights of target client 0 expert 1 sum to 0.9, not 1"),
        (lambda p: p["targets"].pop(), "no row for target client 3 expert 2"),
        (lambda p: p["targets"][0]["sources"][1].update(client=5),
         "source client 5 expert 1 of target client 0 expert 0 is unknown"),
        (lambda p: p.update(clients=[3, 0]), "'clients' must be increasing and distinct"),
        (lambda p: p.update(schema_version=4), "schema_version 4 is not supported"),
        (lambda p: p.update(schema_version=3), "missing key 'arrays'"),
        (lambda p: p.update(top_p=-1), "bad FedMoE-DA parameters (top_p must be >= 0, got -1)"),
    ],
)  # fmt: skip
def test_bad_plans_are_refused(tmp_path: Path, change: Any, message: str) -> None:
    plan = schema_1_plan()
    change(plan)
    path = tmp_path / "bad.json"
    path.write_text(dumps(plan), encoding="utf-8")
    with pytest.raises(InputError) as info:
        load_plan(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_sync_plan_is_frozen() -> None:
    plan = plan_sync(ml_matrices(), 1, 1, (0, 7), METHOD, SIZES2)
    assert isinstance(plan, SyncPlan)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.round = 2  # type: ignore[misc]


def test_transfer_table_concat_orders_rows_and_keeps_each_rows_experts() -> None:
    from fedmoe.plan import Transfers

    a = Transfers.of([Transfer(5, 1, 0, (2, 3), 20), Transfer(0, 9, 0, (1,), 10)])
    b = Transfers.of([Transfer(5, 1, 1, (0,), 7), Transfer(0, 2, 1, (4, 5, 6), 21)])
    both = Transfers.concat([a, Transfers.empty(), b])
    assert list(both) == [
        Transfer(0, 2, 1, (4, 5, 6), 21),
        Transfer(0, 9, 0, (1,), 10),
        Transfer(5, 1, 0, (2, 3), 20),
        Transfer(5, 1, 1, (0,), 7),
    ]
    assert both.received() == {1: 27, 2: 21, 9: 10}
    assert Transfers.of(list(both)) == both and both != a
    assert len(Transfers.concat([])) == 0


# ---------------------------------------------------------------------------------------------
# hubness correction (CSLS) before Eq. 9-10


def _four_rows() -> Neighbours:
    """Rows sorted by decreasing similarity; client-expert 1 is near everyone (a hub)."""
    rows = [
        [(0, 1.0), (1, 0.9), (2, 0.5), (3, 0.4)],
        [(1, 1.0), (0, 0.9), (3, 0.8), (2, 0.1)],
        [(2, 1.0), (1, 0.55), (3, 0.5), (0, 0.1)],
        [(3, 1.0), (1, 0.8), (2, 0.6), (0, 0.4)],
    ]
    return Neighbours(
        np.array([0, 4, 8, 12, 16]),
        np.array([c for r in rows for c, _ in r]),
        np.array([v for r in rows for _, v in r], dtype=np.float32),
        4,
    )


def test_csls_by_hand() -> None:
    """k = 2: r = (0.7, 0.85, 0.525, 0.7) (mean of each row's two best other entries); a score is
    s − (r_target + r_source) / 2, and row 2 now ranks client-expert 3 (−0.1125) above the hub 1
    (−0.1375), which plain similarity ranked first (0.55 > 0.5)."""
    from fedmoe.plan import csls, hub_scores

    nb = _four_rows()
    assert hub_scores(nb, 2) == pytest.approx([0.7, 0.85, 0.525, 0.7], abs=1e-7)
    out = csls(nb, 2)
    assert out.indices[8:12].tolist() == [2, 3, 1, 0]
    assert out.values[8:12] == pytest.approx([0.475, -0.1125, -0.1375, -0.5125], abs=1e-6)
    assert out.indices[0:4].tolist() == [0, 1, 2, 3]  # row 0 keeps its order
    assert out.values[0:4] == pytest.approx([0.3, 0.125, -0.1125, -0.3], abs=1e-6)
    # Eq. 9-10 on the scores: target 2 with P = 1 keeps itself and 3, softmax with tau = 0.5
    a = aggregation_matrix(out, ExpertIndex((0, 1), 2), 1, 0.5)
    sources, weights = a.row(2)
    assert sources.tolist() == [2, 3]
    w3 = 1.0 / (1.0 + math.exp((0.475 + 0.1125) / 0.5))
    assert weights.tolist() == pytest.approx([1 - w3, w3])
    assert aggregation_matrix(nb, ExpertIndex((0, 1), 2), 1, 0.5).row(2)[0].tolist() == [2, 1]
    assert csls(nb, 0) is nb  # off: the paper's similarities


def test_csls_is_a_recorded_fedmoe_da_parameter() -> None:
    with pytest.raises(ParamError, match="csls"):
        FedMoEDA(csls=-1)
    assert FedMoEDA(csls=5).csls == 5
