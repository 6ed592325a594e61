"""Expert proxies and their affinity (FedMoE-DA Eq. 8): the blocked top-k cosine against the full
reference (random data and exact ties), the numbering of client-experts, the share tables."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest
import torch

from fedmoe.affinity import (
    ExpertIndex,
    Neighbours,
    Upload,
    compute_affinity,
    dominant,
    share_table,
    stack_proxies,
    topk_cosine,
    topk_cosine_reference,
)
from fedmoe.errors import InputError


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rows_of(nb: Neighbours) -> list[tuple[list[int], list[float]]]:
    """Every row as plain lists, for readable comparisons."""
    return [(nb.row(m)[0].tolist(), nb.row(m)[1].tolist()) for m in range(nb.num_rows)]


def assert_same(got: Neighbours, ref: Neighbours, exact: bool) -> None:
    """Same rows, same columns in the same order; values exactly or to 1e-6."""
    assert got.k == ref.k
    assert got.indptr.dtype == got.indices.dtype == np.int64
    assert got.values.dtype == np.float32
    assert np.array_equal(got.indptr, ref.indptr)
    assert np.array_equal(got.indices, ref.indices)
    if exact:
        assert np.array_equal(got.values, ref.values)
    else:
        np.testing.assert_allclose(got.values, ref.values, atol=1e-6, rtol=0)


def zero_one_rows(num: int, dim: int, seed: int) -> torch.Tensor:
    """Rows of 0/1 with one or four ones: their norms are 1 or 2, so every cosine (a multiple of
    1/4, 1/2 or 1) is computed exactly in float32 and equal cosines are bitwise ties."""
    rng = np.random.default_rng(seed)
    out = np.zeros((num, dim), dtype=np.float32)
    for i in range(num):
        ones = 1 if rng.random() < 0.3 else 4
        out[i, rng.choice(dim, size=ones, replace=False)] = 1.0
    return torch.from_numpy(out)


# ---------------------------------------------------------------------------------------------
# topk_cosine against the full-matrix reference


RANDOM_CASES = [
    # (M, d, k, block_rows, chunk)
    (1, 8, 1, 256, 128),
    (5, 3, 2, 2, 2),
    (37, 8, 3, 7, 4),  # chunked: 9 chunks > k, tail of 1 column
    (37, 8, 3, 256, 128),  # chunk path inactive (no whole chunk)
    (37, 16, 8, 5, 16),  # 2 chunks ≤ k: every column searched
    (37, 8, 36, 11, 3),  # k = M - 1
    (37, 8, 200, 4, 4),  # k ≥ M: every row holds every column
    (130, 8, 1, 13, 4),  # chunked with k = 1
    (130, 8, 5, 64, 7),  # M not a multiple of chunk (130 = 18·7 + 4)
    (130, 4, 12, 1, 10),  # one row per block
    (130, 8, 12, 130, 1),  # one column per chunk
]


@pytest.mark.parametrize(("num", "dim", "k", "block_rows", "chunk"), RANDOM_CASES)
def test_topk_matches_reference_on_random_data(
    num: int, dim: int, k: int, block_rows: int, chunk: int
) -> None:
    x = torch.randn(num, dim, generator=gen(num * 100 + dim + k))
    got = topk_cosine(x, k, block_rows=block_rows, chunk=chunk)
    ref = topk_cosine_reference(x, k)
    assert_same(got, ref, exact=False)
    threaded = topk_cosine(x, k, block_rows=block_rows, chunk=chunk, workers=2)
    assert_same(threaded, got, exact=True)  # the rows split between threads: same result
    kk = min(k, num)
    assert got.k == kk
    # random data has no ties: exactly k entries per row
    assert np.array_equal(np.diff(got.indptr), np.full(num, kk))


def test_topk_rows_are_the_largest_cosines_in_order() -> None:
    """Independent of the reference: each row is argsort of the float64 cosine row."""
    x = torch.randn(50, 6, generator=gen(3), dtype=torch.float64)
    u = x / x.norm(dim=1, keepdim=True)
    full = (u @ u.T).numpy()
    nb = topk_cosine(x, 6, block_rows=8, chunk=4)
    for m in range(50):
        cols, vals = nb.row(m)
        order = np.argsort(-full[m], kind="stable")[:6]
        assert cols.tolist() == order.tolist()
        np.testing.assert_allclose(vals, np.minimum(full[m][order], 1.0), atol=1e-6)
        assert all(vals[i] >= vals[i + 1] for i in range(5))


def test_self_similarity_is_exactly_one_and_first() -> None:
    x = torch.randn(40, 8, generator=gen(5)) * 1e3  # scale changes nothing
    for k, block_rows, chunk in ((1, 6, 4), (4, 40, 128), (10, 3, 2)):
        nb = topk_cosine(x, k, block_rows=block_rows, chunk=chunk)
        for m in range(40):
            cols, vals = nb.row(m)
            assert int(cols[0]) == m
            assert float(vals[0]) == 1.0  # exactly, not 0.99999994
            assert bool((vals[1:] < 1.0).all())


CHUNK_PARAMS = [(1, 128), (3, 5), (64, 5), (7, 2), (101, 13), (16, 1)]


@pytest.mark.parametrize("k", [1, 2, 5, 17, 101, 150])
def test_topk_matches_reference_exactly_with_many_ties(k: int) -> None:
    """0/1 rows: many equal cosines (and duplicated rows at 1.0); every tie at the k-th value is
    kept, whatever the block and chunk sizes (chunk path active and inactive)."""
    x = zero_one_rows(101, 8, seed=k)
    x = torch.cat([x, x[:9]])  # nine exact duplicates as well: M = 110, not a multiple of 13
    ref = topk_cosine_reference(x, k)
    kk = min(k, 110)
    for (block_rows, chunk), workers in zip(CHUNK_PARAMS, itertools.cycle((1, 2, 3)), strict=False):
        got = topk_cosine(x, k, block_rows=block_rows, chunk=chunk, workers=workers)
        assert_same(got, ref, exact=True)
    lengths = np.diff(ref.indptr)
    assert bool((lengths >= kk).all())
    if kk < 110:
        assert int(lengths.max()) > kk  # ties did reach the k-th value somewhere
    else:
        assert bool((lengths == 110).all())
    # what the reference keeps: every entry ≥ the k-th largest value, nothing else
    u = x / x.norm(dim=1, keepdim=True)
    full = (u.double() @ u.double().T).clamp(max=1.0)
    for m in range(110):
        kth = torch.sort(full[m], descending=True).values[kk - 1]
        expected = torch.nonzero(full[m] >= kth).flatten()
        cols, vals = ref.row(m)
        assert sorted(cols.tolist()) == expected.tolist()
        assert vals.astype(np.float64).tolist() == full[m, torch.from_numpy(cols)].tolist()


def test_ties_at_the_kth_value_are_all_kept_by_hand() -> None:
    """Rows e0, e0, e0, e1, e1, e2 (one-hot): cosines are 1 within a group and 0 across."""
    eye = torch.eye(3)
    x = eye[[0, 0, 0, 1, 1, 2]]
    nb = topk_cosine(x, 2, block_rows=4, chunk=2)
    assert rows_of(nb) == [
        ([0, 1, 2], [1.0, 1.0, 1.0]),
        ([0, 1, 2], [1.0, 1.0, 1.0]),
        ([0, 1, 2], [1.0, 1.0, 1.0]),
        ([3, 4], [1.0, 1.0]),
        ([3, 4], [1.0, 1.0]),
        # the 2nd largest is 0, shared by the five others: all kept
        ([5, 0, 1, 2, 3, 4], [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]),
    ]
    assert nb.k == 2
    # k = 1 still keeps every duplicate at 1.0 (ordered by column, self not necessarily first)
    one = topk_cosine(x, 1, block_rows=1, chunk=1)
    assert rows_of(one)[1] == ([0, 1, 2], [1.0, 1.0, 1.0])
    assert rows_of(one)[5] == ([5], [1.0])


def test_identical_proxies_always_tie_at_one() -> None:
    x = torch.randn(40, 8, generator=gen(0))
    x = torch.cat([x, x])  # proxy m + 40 is an exact copy of proxy m
    results = [topk_cosine(x, 1, block_rows=b, chunk=128) for b in (1, 3, 16, 80)]
    for nb in [*results, topk_cosine_reference(x, 1)]:
        for m in range(80):
            cols, vals = nb.row(m)
            assert cols.tolist() == sorted({m, (m + 40) % 80}), m
            assert vals.tolist() == [1.0, 1.0]


def test_hand_computed_cosines_at_chosen_angles() -> None:
    """Unit vectors at 0°, 60°, 90° and 180° (scaled): cosines 1/2, 0, √3/2, -1, ..."""
    angles = [0.0, 60.0, 90.0, 180.0]
    scale = [1.0, 3.0, 0.5, 2.0]
    x = torch.tensor(
        [
            [s * math.cos(math.radians(a)), s * math.sin(math.radians(a))]
            for a, s in zip(angles, scale, strict=True)
        ]
    )
    nb = topk_cosine(x, 4)
    expected = {
        0: [(0, 1.0), (1, 0.5), (2, 0.0), (3, -1.0)],
        1: [(1, 1.0), (2, math.sqrt(3) / 2), (0, 0.5), (3, -0.5)],
        2: [(2, 1.0), (1, math.sqrt(3) / 2), (0, 0.0), (3, 0.0)],
        3: [(3, 1.0), (2, 0.0), (1, -0.5), (0, -1.0)],
    }
    for m, row in expected.items():
        cols, vals = nb.row(m)
        if m in (2, 3):  # the two cosines of 0 are ties only up to rounding: compare as sets
            assert int(cols[0]) == m and int(cols[1]) == row[1][0]
            assert sorted(cols[2:].tolist()) == sorted(c for c, _ in row[2:])
        else:
            assert cols.tolist() == [c for c, _ in row]
        got = dict(zip(cols.tolist(), vals.tolist(), strict=True))
        for c, v in row:
            assert got[c] == pytest.approx(v, abs=1e-6)


def test_zero_proxy_row_is_refused() -> None:
    x = torch.randn(5, 4, generator=gen(0))
    x[3] = 0.0
    with pytest.raises(InputError, match="proxy row 3 is all zeros"):
        topk_cosine(x, 2)
    with pytest.raises(InputError, match="proxy row 3 is all zeros"):
        topk_cosine_reference(x, 2)


def test_inputs_are_not_modified_and_any_float_dtype_works() -> None:
    x = torch.randn(20, 5, generator=gen(1), dtype=torch.float64)
    before = x.clone()
    a = topk_cosine(x, 3, block_rows=4, chunk=2)
    assert torch.equal(x, before)
    b = topk_cosine(x.to(torch.float32), 3, block_rows=4, chunk=2)
    assert_same(a, b, exact=True)  # rows are normalised in float32 either way


# ---------------------------------------------------------------------------------------------
# the client-expert numbering


def test_expert_index_numbering() -> None:
    index = ExpertIndex((2, 5, 9), 4)
    assert index.size == 12
    assert [index.key(m) for m in range(12)] == [(c, j) for c in (2, 5, 9) for j in range(4)]
    assert all(index.index(*index.key(m)) == m for m in range(12))
    assert index.index(9, 1) == 9


def test_stack_proxies_does_not_depend_on_dict_order() -> None:
    gates = {c: torch.randn(3, 4, generator=gen(c)) for c in (7, 0, 3)}
    matrix, index = stack_proxies(gates)
    assert index == ExpertIndex((0, 3, 7), 3)
    assert matrix.shape == (9, 4) and matrix.dtype == np.float32
    for m in range(9):
        c, j = index.key(m)
        assert np.array_equal(matrix[m], gates[c][j].numpy())
    for order in itertools.permutations((7, 0, 3)):
        other, other_index = stack_proxies({c: gates[c] for c in order})
        assert other_index == index
        assert np.array_equal(other, matrix)


def test_stack_proxies_reads_half_precision_gates_as_float32() -> None:
    gates = {0: torch.ones(2, 3, dtype=torch.bfloat16), 1: torch.eye(2, 3, dtype=torch.float64)}
    matrix, _ = stack_proxies(gates)
    assert matrix.dtype == np.float32
    assert matrix.tolist() == [[1.0] * 3, [1.0] * 3, [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]


# ---------------------------------------------------------------------------------------------
# share tables from routing statistics


def test_share_table_on_hand_made_routing() -> None:
    index = ExpertIndex((1, 4, 6), 2)
    routing = {
        6: {"by_domain": [[0, 4], [3, 1]], "by_label": [[1, 1, 2], [0, 0, 0]]},
        1: {"by_domain": [[2, 2], [0, 0]]},  # no label table
        4: None,  # never trained
    }
    dom = share_table(routing, index, "by_domain", 3)  # wider than the data: zero padding
    assert dom.tolist() == [
        [0.5, 0.5, 0.0],
        [0.0, 0.0, 0.0],  # an expert that received nothing
        [0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0],
        [0.0, 1.0, 0.0],
        [0.75, 0.25, 0.0],
    ]
    lab = share_table(routing, index, "by_label", 3)
    assert lab.tolist() == [[0.0] * 3] * 4 + [[0.25, 0.25, 0.5], [0.0, 0.0, 0.0]]
    arg, share = dominant(dom)
    assert arg.tolist() == [0, -1, -1, -1, 1, 0]  # the first of two equal shares; -1 if empty
    assert share.tolist() == [0.5, 0.0, 0.0, 0.0, 1.0, 0.75]


def uploads(
    gates: dict[int, torch.Tensor], routing: dict[int, Any], rounds: dict[int, int] | None = None
) -> dict[int, Upload]:
    """One-layer uploads (round 1 unless given)."""
    return {
        c: Upload(c, 10, (rounds or {}).get(c, 1), (g,), routing.get(c)) for c, g in gates.items()
    }


def test_compute_affinity_end_to_end() -> None:
    gates = {
        3: torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
        1: torch.tensor([[2.0, 0.0], [1.0, 1.0]]),
    }
    routing = {
        1: {"by_domain": [[1, 3, 0], [0, 0, 2]], "by_label": [[1, 0], [0, 2]]},
        3: None,
    }
    full = compute_affinity(uploads(gates, routing), candidates=2, num_classes=2)
    assert len(full.layers) == 1 and full.stale == () and full.round == 1
    aff = full.layers[0]
    assert aff.index == ExpertIndex((1, 3), 2)
    # m: 0 = (1,0) → [1,0]; 1 = (1,1) → [1,1]/√2; 2 = (3,0) → [1,0]; 3 = (3,1) → [0,1]
    assert aff.neighbours.k == 2
    # row 1 ties at 1/√2 with all three others: every one is kept
    assert [r[0] for r in rows_of(aff.neighbours)] == [[0, 2], [1, 0, 2, 3], [0, 2], [3, 1]]
    assert aff.by_domain.shape == (4, 3)  # width from the widest routing table
    assert aff.by_domain[:2].tolist() == [[0.25, 0.75, 0.0], [0.0, 0.0, 1.0]]
    assert aff.by_label.tolist() == [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]]


def test_compute_affinity_marks_stale_uploads_and_reads_layered_routing() -> None:
    gates = {0: torch.eye(2), 1: torch.eye(2), 2: torch.eye(2)}
    routing = {0: {"num_samples": 4, "layers": [{"by_domain": [[4, 0], [0, 4]]}]}}
    full = compute_affinity(uploads(gates, routing, {0: 3, 1: 2, 2: 3}), 3, 2)
    assert full.round == 3 and full.stale == (1,) and full.clients == (0, 1, 2)
    assert full.layers[0].by_domain[:2].tolist() == [[1.0, 0.0], [0.0, 1.0]]


def test_compute_affinity_one_result_per_moe_layer() -> None:
    ups = {
        c: Upload(c, 5, 1, (torch.eye(3) + c, torch.eye(3) * (c + 1) - 0.5), None) for c in (0, 1)
    }
    full = compute_affinity(ups, 2, 2)
    assert [la.layer for la in full.layers] == [0, 1]
    assert all(la.index == ExpertIndex((0, 1), 3) for la in full.layers)


def test_compute_affinity_refuses_bad_gates() -> None:
    with pytest.raises(InputError, match="no client checkpoints"):
        compute_affinity({}, 2, 2)
    with pytest.raises(InputError, match="gate weights of different shapes"):
        compute_affinity(uploads({0: torch.ones(2, 3), 1: torch.ones(3, 3)}, {}), 2, 2)
    with pytest.raises(InputError, match="all zeros"):
        compute_affinity(uploads({0: torch.ones(2, 3), 1: torch.zeros(2, 3)}, {}), 2, 2)


def test_pooled_layers_compare_expert_j_over_every_layer_by_hand() -> None:
    """Two clients, two MoE layers of two experts. Layer 0 says expert 0 of client 0 is like
    expert 1 of client 1 (cosine 1), layer 1 says the opposite (cosine -1 there, +1 with expert
    0): pooled, each cosine is the mean of the layers' (1 + 0)/2, (1 - 1)/2, ..."""
    a0 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b0 = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # client 1's layer 0: experts swapped
    a1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b1 = torch.tensor([[1.0, 0.0], [0.0, -1.0]])  # client 1's layer 1: expert 0 alike, 1 opposed
    ups = {0: Upload(0, 5, 1, (a0, a1), None), 1: Upload(1, 5, 1, (b0, b1), None)}
    pooled = compute_affinity(ups, 4, 2, pooled=True)
    assert pooled.pooled and len(pooled.layers) == 2
    nb = pooled.layers[0].neighbours
    assert pooled.layers[1].neighbours is nb  # one neighbour list for every layer
    sims = {(0, int(m2)): float(v) for m2, v in zip(*nb.row(0), strict=True)}
    # client-expert 0 = (client 0, expert 0): against itself 1; (0, 1): (0 + 0)/2;
    # (1, 0) = m 2: layer 0 cos(a0[0], b0[0]) = 0, layer 1 cos(a1[0], b1[0]) = 1 → 0.5;
    # (1, 1) = m 3: layer 0 1, layer 1 0 → 0.5
    assert sims == pytest.approx({(0, 0): 1.0, (0, 1): 0.0, (0, 2): 0.5, (0, 3): 0.5})
    sims1 = {int(m2): float(v) for m2, v in zip(*nb.row(1), strict=True)}
    # (0, 1) against (1, 0): layer 0 1, layer 1 0 → 0.5; against (1, 1): 0 and -1 → -0.5
    assert sims1[2] == pytest.approx(0.5) and sims1[3] == pytest.approx(-0.5)
    # per layer, the same uploads give other neighbours
    plain = compute_affinity(ups, 4, 2)
    assert not plain.pooled
    cols, vals = plain.layers[0].neighbours.row(0)
    per_layer = {int(m2): float(v) for m2, v in zip(cols, vals, strict=True)}
    assert per_layer[3] == pytest.approx(1.0)  # layer 0 alone: (0, 0) is (1, 1)


def test_pooling_needs_one_expert_count_in_every_layer() -> None:
    ups = {c: Upload(c, 5, 1, (torch.eye(3) + c, torch.eye(2) + c), None) for c in (0, 1)}
    with pytest.raises(InputError, match="one expert count in every layer"):
        compute_affinity(ups, 2, 2, pooled=True)
    assert len(compute_affinity(ups, 2, 2).layers) == 2  # per layer it is fine


def test_overwrite_normalises_an_owned_array_in_place_with_the_same_result() -> None:
    x = np.random.default_rng(4).standard_normal((300, 7)).astype(np.float32)
    expected = topk_cosine(x.copy(), 5, block_rows=64, chunk=8)
    owned = x.copy()
    got = topk_cosine(owned, 5, block_rows=64, chunk=8, overwrite=True)
    assert got.same_as(expected)
    np.testing.assert_allclose(np.linalg.norm(owned, axis=1), 1.0, rtol=1e-6)  # normalised
    kept = x.copy()
    topk_cosine(kept, 5)  # without overwrite the input is left alone
    assert np.array_equal(kept, x)


def centre_federation() -> dict[int, Upload]:
    """Five clients, two experts, H = 3. Expert 0: clients 0 and 1 share a domain (second
    coordinate +1), clients 2 and 3 another (-1); client 4 uploads the centre (10, 0, 0), as ALIE
    does. Client 1's expert 1 is a copy of client 0's expert 0 (a cross-index twin)."""
    e0 = [[10, 1, 0.8], [10, 1, -0.8], [10, -1, 0.8], [10, -1, -0.8], [10, 0, 0]]
    e1 = [[0, 10, 1], [10, 1, 0.8], [0, 10, -1], [1, 10, 0], [0, 9, 0]]
    return {
        c: Upload(c, 5, 1, (torch.tensor([e0[c], e1[c]], dtype=torch.float32),), None)
        for c in range(5)
    }


def test_centre_rows_by_hand() -> None:
    from fedmoe.affinity.centre import centre_rows

    got = centre_rows(np.array([[1, 0], [0, 1], [1, 1]], dtype=np.float32))
    # the coordinate-wise median is (1, 1): (0, -1), (-1, 0) and an all-zero row, flagged
    assert got.tolist() == [[0, -1, 0], [-1, 0, 0], [0, 0, 1]]


def test_centred_proxies_rank_same_expert_peers_and_leave_the_centre_out() -> None:
    """By hand. Plain cosines of client 0's expert 0 (m = 0): with the centre 10/√101.64 =
    0.99190, with client 1's expert 0 (100 + 1 - 0.64)/101.64 = 0.98741, and 1 with client 1's
    expert 1 (m = 3, its copy). Centred on expert 0's median row (10, 0, 0): (0, 1, 0.8) against
    (0, 1, -0.8) is (1 - 0.64)/1.64 = 0.21951, against clients 2 and 3 -0.21951 and -1, and the
    centre is all zero (cosine 0 with everyone, 1 with itself)."""
    ups = centre_federation()
    plain = compute_affinity(ups, 2, 2).layers[0].neighbours
    assert plain.row(0)[0].tolist() == [0, 3]  # the cross-index copy
    assert compute_affinity(ups, 3, 2).layers[0].neighbours.row(0)[0].tolist() == [0, 3, 8]
    aff = compute_affinity(ups, 5, 2, centred=True)
    assert aff.centred and not aff.pooled
    nb = aff.layers[0].neighbours
    cols, vals = nb.row(0)
    assert cols.tolist() == [0, 2, 8, 4, 6]  # expert 0 of clients 0, 1, 4 (the centre), 2, 3
    assert vals.tolist() == pytest.approx([1.0, 0.21951, 0.0, -0.21951, -1.0], abs=1e-5)
    assert nb.plain is not None
    assert nb.row(0)[0].size == 5 and all(int(c) % 2 == 0 for c in cols)  # only expert 0
    plain_row = nb.plain[nb.indptr[0] : nb.indptr[1]].tolist()
    assert plain_row[:3] == pytest.approx([1.0, 0.98741, 0.99190], abs=1e-5)
    centre = nb.row(8)  # the centre's own row: itself, then everyone at 0 (ties, by column)
    assert centre[0].tolist() == [8, 0, 2, 4, 6] and centre[1].tolist() == [1, 0, 0, 0, 0]
    # expert 1 rows are compared among expert 1 only
    assert all(int(c) % 2 == 1 for m in range(1, 10, 2) for c in nb.row(m)[0])


def test_centred_choice_with_plain_weights_by_hand() -> None:
    """Eq. 9 keeps client 0's own expert and the best centred peer (client 1's expert 0); Eq. 10
    weighs them by their plain cosines 1 and 0.98741: a = (1, e^((0.98741 - 1)/τ)) / sum."""
    from fedmoe.plan.matrix import aggregation_matrix

    aff = compute_affinity(centre_federation(), 5, 2, centred=True)
    la = aff.layers[0]
    a = aggregation_matrix(la.neighbours, la.index, 1, 0.1)
    src, w = a.row(0)
    assert src.tolist() == [0, 2]
    other = math.exp((100.36 / 101.64 - 1) / 0.1)
    assert w.tolist() == pytest.approx([1 / (1 + other), other / (1 + other)], abs=1e-5)
    assert a.similarity[:2].tolist() == pytest.approx([1.0, 0.98741], abs=1e-5)
    # the paper's plain ranking of the same uploads gives the copy (and the centre) instead
    plain = compute_affinity(centre_federation(), 5, 2).layers[0]
    assert aggregation_matrix(plain.neighbours, plain.index, 1, 0.1).row(0)[0].tolist() == [0, 3]
