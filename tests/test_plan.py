"""The sparse aggregation matrix of FedMoE-DA (Eq. 9–10) on hand-computed cases, the transfer list
it implies (Eq. 11), the traffic ledger and the byte sizes behind it."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmoe.affinity import ExpertIndex, Neighbours, topk_cosine
from fedmoe.errors import UsageError
from fedmoe.io.atomic import OutputSet
from fedmoe.io.checkpoint import CheckpointMeta, open_checkpoint, save_checkpoint
from fedmoe.model import MoEConfig, init_model, state_of
from fedmoe.plan import (
    AggregationMatrix,
    TensorSizes,
    Transfer,
    aggregation_matrix,
    identity_matrix,
    tensor_sizes,
    traffic_ledger,
    transfer_list,
)


def neighbours(rows: list[list[tuple[int, float]]], k: int) -> Neighbours:
    """Hand-made neighbour rows [(column, similarity), ...], each sorted as topk_cosine sorts."""
    counts = [len(r) for r in rows]
    indptr = torch.zeros(len(rows) + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(torch.tensor(counts), 0)
    return Neighbours(
        indptr,
        torch.tensor([c for r in rows for c, _ in r], dtype=torch.int64),
        torch.tensor([v for r in rows for _, v in r], dtype=torch.float32),
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
    with pytest.raises(
        UsageError, match="--top-p 4 needs 5 candidates per row but the affinity kept 4"
    ) as info:
        aggregation_matrix(nb, INDEX6, 4, 0.1)
    assert info.value.hint == "re-run fedmoe affinity with --candidates 5 or more"
    # with M = 6, P = 5 needs 6 and P = 9 also needs only M = 6
    full = neighbours([[*r, *[(c, -1.0) for c in range(6) if c not in dict(r)]] for r in HAND], 6)
    assert np.diff(aggregation_matrix(full, INDEX6, 9, 0.1).indptr).tolist() == [6] * 6
    for tau in (0.0, -1.0, float("nan")):
        with pytest.raises(UsageError, match="--tau must be > 0"):
            aggregation_matrix(nb, INDEX6, 1, tau)
    with pytest.raises(UsageError, match="--top-p must be >= 0"):
        aggregation_matrix(nb, INDEX6, -1, 0.1)


def test_neighbours_are_not_modified() -> None:
    nb = neighbours(HAND, 4)
    copies = [t.clone() for t in (nb.indptr, nb.indices, nb.values)]
    aggregation_matrix(nb, INDEX6, 2, 0.25)
    for a, b in zip(copies, (nb.indptr, nb.indices, nb.values), strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# transfers and the ledger


def test_transfer_list_dedups_experts_per_pair() -> None:
    a = aggregation_matrix(neighbours(HAND, 4), INDEX6, 2, tau=0.25)
    got = transfer_list(a, expert_bytes=300)
    # client 0's experts 0 and 1 both use (1, 1): it is fetched once
    assert got == [
        Transfer(0, 1, (0, 1), 600),
        Transfer(0, 2, (0,), 300),
        Transfer(1, 0, (1,), 300),
        Transfer(1, 2, (0, 1), 600),
        Transfer(2, 0, (1,), 300),
        Transfer(2, 1, (0,), 300),
    ]
    # own experts never move; the identity moves nothing
    assert transfer_list(aggregation_matrix(neighbours(HAND, 4), INDEX6, 0, 0.25), 300) == []


def test_transfer_list_uses_client_ids_not_positions() -> None:
    index = ExpertIndex((10, 20), 1)
    a = aggregation_matrix(
        neighbours([[(0, 1.0), (1, 0.5)], [(1, 1.0), (0, 0.5)]], 2), index, 1, 1.0
    )
    assert transfer_list(a, 7) == [Transfer(10, 20, (0,), 7), Transfer(20, 10, (0,), 7)]


def test_traffic_ledger_by_hand() -> None:
    sizes = TensorSizes(embed=1000, gate=64, expert=300, num_experts=2)
    assert sizes.model == 1000 + 64 + 2 * 300
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
    ],
)  # fmt: skip
def test_tensor_sizes_equal_real_checkpoint_bytes(cfg: MoEConfig, tmp_path: Path) -> None:
    state = state_of(init_model(cfg, 0))
    path = tmp_path / "c.safetensors"
    with OutputSet() as outputs:
        save_checkpoint(outputs, path, state, CheckpointMeta(cfg, 0, 1, 5, 0, "train"))
    ck = open_checkpoint(path)
    part = {"embed": 0, "gate": 0, "experts": 0}
    for name in ck.names:
        part[name.split(".")[0]] += ck.tensor(name).nbytes
    sizes = tensor_sizes(cfg)
    assert (sizes.embed, sizes.gate) == (part["embed"], part["gate"])
    assert sizes.num_experts == cfg.num_experts
    assert sizes.expert * cfg.num_experts == part["experts"]
    experts = [n for n in ck.names if n.startswith("experts.")]
    for j in range(cfg.num_experts):  # one expert slice, read as the peers read it
        assert sum(ck.expert(n, j).nbytes for n in experts) == sizes.expert
    assert sizes.model == sum(t.nbytes for t in state.values())
    # the whole file is the header plus exactly those bytes
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert path.stat().st_size == 8 + header_len + sizes.model
    assert cfg.gate_bias == (sizes.gate == 4 * cfg.num_experts * (cfg.embed_dim + 1))
