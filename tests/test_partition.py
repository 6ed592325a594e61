"""Partition schemes, the shared pipeline, the allocation helpers and the skew metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedmoe.data import Dataset, DataSpec
from fedmoe.errors import ParamError, UsageError
from fedmoe.io.datasets import load_dataset
from fedmoe.partition import PARTITIONERS, Partition, get_partitioner, make_partition
from fedmoe.partition.allocate import (
    allocate_by_key,
    allocate_even,
    dirichlet_shares,
    keys_per_client_shares,
    reserve,
    small_uint,
)
from fedmoe.partition.metrics import hellinger, js_distance, skew_metrics


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset(DataSpec("digits-rot"))


def split(
    labels: np.ndarray | list[int],
    domains: np.ndarray | list[int],
    num_clients: int,
    scheme: str,
    seed: int = 0,
    **options: object,
) -> Partition:
    """A partition with no global or local test hold-out: the clients are the scheme's output."""
    return make_partition(
        np.asarray(labels),
        np.asarray(domains),
        num_clients,
        get_partitioner(scheme, options),
        seed,
        global_test_fraction=0.0,
        local_test_fraction=0.0,
    )


def sizes(p: Partition) -> list[int]:
    return [int(c.train.size + c.test.size) for c in p.clients]


def members(p: Partition, i: int) -> np.ndarray:
    c = p.clients[i]
    return np.concatenate([c.train, c.test])


# ---------------------------------------------------------------------------------------------
# hand-checked small cases, one scheme at a time


def test_iid_sizes_differ_by_at_most_one() -> None:
    p = split(np.zeros(10, int), np.zeros(10, int), 3, "iid")
    assert sizes(p) == [4, 3, 3]  # 10 = 3·3 + 1: the first client takes the extra sample
    assert p.unassigned.size == 0


def test_iid_on_digits_sizes(digits: Dataset) -> None:
    p = make_partition(digits.y, digits.domain, 7, get_partitioner("iid", {}), seed=3)
    pool = digits.num_samples - p.global_test.size
    assert sum(sizes(p)) == pool
    assert max(sizes(p)) - min(sizes(p)) <= 1


def test_iid_shuffles_a_sorted_source() -> None:
    labels = np.repeat(np.arange(2), 50)  # sorted: a cut in stored order gives 1 label per client
    p = split(labels, np.zeros(100, int), 2, "iid")
    assert (p.label_counts > 0).all()


def test_dirichlet_single_client_gets_everything() -> None:
    labels = np.repeat(np.arange(3), 4)
    p = split(labels, np.zeros(12, int), 1, "dirichlet", alpha=0.1)
    assert p.label_counts.tolist() == [[4, 4, 4]]


def test_dirichlet_min_size_holds_at_tiny_alpha(digits: Dataset) -> None:
    scheme = get_partitioner("dirichlet", {"alpha": 0.01, "min_size": 12})
    p = make_partition(digits.y, digits.domain, 30, scheme, 0)
    assert min(sizes(p)) >= 12


def test_domain_one_domain_per_client() -> None:
    domains = np.repeat(np.arange(4), 10)  # 4 domains × 10 samples
    labels = np.tile(np.arange(5), 8)
    p = split(labels, domains, 4, "domain", domains_per_client=1)
    # each client holds exactly one domain, all 10 of its samples, and no two share a domain
    assert sorted(p.domain_counts.tolist()) == [
        [0, 0, 0, 10],
        [0, 0, 10, 0],
        [0, 10, 0, 0],
        [10, 0, 0, 0],
    ]
    for i in range(4):
        assert np.unique(domains[members(p, i)]).size == 1


def test_domain_two_domains_per_client_split_evenly() -> None:
    domains = np.repeat(np.arange(4), 10)
    p = split(np.zeros(40, int), domains, 6, "domain", domains_per_client=2)
    dc = p.domain_counts  # (6, 4)
    assert ((dc > 0).sum(axis=1) == 2).all()  # exactly two domains per client
    assert (dc.sum(axis=0) == 10).all()  # 6 clients ≥ 4 domains: every domain has a holder
    for d in range(4):
        held = dc[:, d][dc[:, d] > 0]
        assert held.max() - held.min() <= 1  # each domain split evenly among its holders


def test_domain_all_domains_per_client_is_an_even_split() -> None:
    domains = np.repeat(np.arange(4), 10)
    p = split(np.zeros(40, int), domains, 4, "domain", domains_per_client=4)
    # 10 samples over 4 holders: 3, 3, 2, 2 — the extra samples go to the lowest client ids
    assert p.domain_counts.tolist() == [[3] * 4, [3] * 4, [2] * 4, [2] * 4]


def test_domain_fewer_clients_than_domains_leaves_unheld_domains_unassigned() -> None:
    domains = np.repeat(np.arange(4), 10)
    p = split(np.zeros(40, int), domains, 2, "domain", domains_per_client=1)
    assert sorted(sizes(p)) == [10, 10]
    assert p.unassigned.size == 20
    assert np.unique(domains[p.unassigned]).size == 2


def test_domain_dirichlet_skews_domains_not_labels(digits: Dataset) -> None:
    p = make_partition(digits.y, digits.domain, 10, get_partitioner("domain", {"alpha": 0.1}), 0)
    assert p.metrics["domain_js_mean"] > 2 * p.metrics["label_js_mean"]
    assert min(sizes(p)) >= 2  # the default min_size


def test_domain_label_one_domain_per_client() -> None:
    domains = np.repeat(np.arange(4), 12)
    labels = np.tile(np.arange(3), 16)
    p = split(labels, domains, 4, "domain-label", domains_per_client=1, min_size=0)
    assert sorted(p.domain_counts.tolist()) == [
        [0, 0, 0, 12],
        [0, 0, 12, 0],
        [0, 12, 0, 0],
        [12, 0, 0, 0],
    ]


def test_domain_label_fewer_clients_than_domains_keeps_one_domain_per_client() -> None:
    domains = np.repeat(np.arange(4), 10)
    labels = np.tile(np.arange(2), 20)
    p = split(labels, domains, 2, "domain-label", domains_per_client=1, min_size=0)
    assert ((p.domain_counts > 0).sum(axis=1) == 1).all()  # as the 'domain' scheme does
    assert p.unassigned.size == 20


@pytest.mark.parametrize(
    ("options", "skewed", "flat"),
    [
        ({"alpha": 100.0, "alpha_domain": 0.1}, "domain_js_mean", "label_js_mean"),
        ({"alpha": 0.1, "alpha_domain": 100.0}, "label_js_mean", "domain_js_mean"),
    ],
)
def test_domain_label_concentrations_dial_each_skew(
    digits: Dataset, options: dict, skewed: str, flat: str
) -> None:
    p = make_partition(digits.y, digits.domain, 10, get_partitioner("domain-label", options), 0)
    assert p.metrics[skewed] > 2 * p.metrics[flat]


def test_shards_one_shard_per_client_on_sorted_labels() -> None:
    labels = np.repeat(np.arange(3), 4)  # [0 0 0 0 1 1 1 1 2 2 2 2]
    part = get_partitioner("shards", {"shards_per_client": 1})
    owner = part.assign(labels, np.zeros(12, int), 3, np.random.default_rng(0))
    for i in range(3):
        assert (owner == i).sum() == 4
        assert np.unique(labels[owner == i]).size == 1  # a single-label client
    assert sorted(np.unique(labels[owner == i]).item() for i in range(3)) == [0, 1, 2]


def test_shards_two_shards_per_client() -> None:
    labels = np.repeat(np.arange(6), 2)  # 12 samples, 6 shards of 2: one label per shard
    p = split(labels, np.zeros(12, int), 3, "shards", shards_per_client=2)
    for row in p.label_counts.tolist():
        assert sorted(row) == [0, 0, 0, 0, 2, 2]  # two labels, two samples each


def test_shards_one_class_per_client() -> None:
    labels = np.repeat(np.arange(3), 5)
    p = split(labels, np.zeros(15, int), 3, "shards", classes_per_client=1)
    assert sorted(p.label_counts.tolist()) == [[0, 0, 5], [0, 5, 0], [5, 0, 0]]


def test_shards_k_classes_per_client(digits: Dataset) -> None:
    p = make_partition(
        digits.y, digits.domain, 12, get_partitioner("shards", {"classes_per_client": 3}), 0
    )
    lc = p.label_counts  # (12, 10)
    assert ((lc > 0).sum(axis=1) == 3).all()
    assert p.unassigned.size == 0  # 12 clients ≥ 10 classes: every class has a holder
    for c in range(10):
        held = lc[:, c][lc[:, c] > 0]
        assert held.max() - held.min() <= 1


@pytest.mark.parametrize("dist", ["dirichlet", "lognormal"])
def test_quantity_min_size_equal_to_share_gives_equal_clients(dist: str) -> None:
    # n = N · min_size leaves nothing for the random part: every client gets exactly min_size
    p = split(np.zeros(20, int), np.zeros(20, int), 4, "quantity", size_dist=dist, min_size=5)
    assert sizes(p) == [5, 5, 5, 5]


@pytest.mark.parametrize(
    "options", [{"size_dist": "dirichlet", "alpha": 0.1}, {"size_dist": "lognormal", "sigma": 2.0}]
)
def test_quantity_skews_sizes(digits: Dataset, options: dict) -> None:
    q = make_partition(digits.y, digits.domain, 10, get_partitioner("quantity", options), 0)
    i = make_partition(digits.y, digits.domain, 10, get_partitioner("iid", {}), 0)
    assert min(sizes(q)) >= 2
    assert sum(sizes(q)) == sum(sizes(i))
    assert q.metrics["size_cv"] > 0.5 > 0.01 > i.metrics["size_cv"]


# ---------------------------------------------------------------------------------------------
# invariants of every scheme, through make_partition

CONFIGS: list[tuple[str, dict[str, object], int | None]] = [
    # (scheme, options, guaranteed minimum client size or None)
    ("iid", {}, None),
    ("dirichlet", {"alpha": 0.1, "min_size": 5}, 5),
    ("domain", {"alpha": 0.1, "min_size": 5}, 5),
    ("domain", {"domains_per_client": 2}, None),
    ("domain-label", {"alpha": 0.3, "alpha_domain": 0.3, "min_size": 5}, 5),
    ("domain-label", {"domains_per_client": 1}, 2),
    ("shards", {"shards_per_client": 2}, None),
    ("shards", {"classes_per_client": 2}, None),
    ("quantity", {"size_dist": "dirichlet", "alpha": 0.2, "min_size": 5}, 5),
    ("quantity", {"size_dist": "lognormal", "sigma": 1.5, "min_size": 5}, 5),
]
CONFIG_IDS = [f"{s}-{'-'.join(map(str, o.values())) or 'default'}" for s, o, _ in CONFIGS]


def test_every_scheme_is_covered() -> None:
    assert {s for s, _, _ in CONFIGS} == set(PARTITIONERS)


def _run(digits: Dataset, scheme: str, options: dict, seed: int = 0) -> Partition:
    return make_partition(digits.y, digits.domain, 10, get_partitioner(scheme, options), seed)


@pytest.mark.parametrize(("scheme", "options", "min_size"), CONFIGS, ids=CONFIG_IDS)
def test_scheme_invariants(
    digits: Dataset, scheme: str, options: dict, min_size: int | None
) -> None:
    n = digits.num_samples
    p = _run(digits, scheme, options)
    assert p.scheme == scheme and len(p.clients) == 10

    parts = [p.global_test, p.unassigned]
    for c in p.clients:
        for arr in (c.train, c.test):
            assert arr.dtype == np.int64
            assert (np.diff(arr) > 0).all()  # ascending, no repeats
        parts += [c.train, c.test]
    # clients, global test and unassigned cover every index exactly once
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n))

    # the counts describe the clients' actual samples
    for i in range(10):
        idx = members(p, i)
        assert p.label_counts[i].tolist() == np.bincount(digits.y[idx], minlength=10).tolist()
        assert p.domain_counts[i].tolist() == np.bincount(digits.domain[idx], minlength=4).tolist()
    assert p.metrics["size_min"] == min(sizes(p)) and p.metrics["size_max"] == max(sizes(p))
    if min_size is not None:
        assert min(sizes(p)) >= min_size
    assert p.params == {**get_partitioner(scheme, {}).params(), **options}


@pytest.mark.parametrize(("scheme", "options", "min_size"), CONFIGS, ids=CONFIG_IDS)
def test_scheme_determinism(
    digits: Dataset, scheme: str, options: dict, min_size: int | None
) -> None:
    a, b, c = (_run(digits, scheme, options, seed) for seed in (5, 5, 6))
    for x, y in zip(a.clients, b.clients, strict=True):
        np.testing.assert_array_equal(x.train, y.train)
        np.testing.assert_array_equal(x.test, y.test)
    np.testing.assert_array_equal(a.global_test, b.global_test)
    np.testing.assert_array_equal(a.unassigned, b.unassigned)
    assert a.metrics == b.metrics
    assert any(
        not np.array_equal(x.train, y.train) for x, y in zip(a.clients, c.clients, strict=True)
    )


def test_global_test_does_not_depend_on_the_scheme(digits: Dataset) -> None:
    held = [_run(digits, s, o, seed=11).global_test for s, o, _ in CONFIGS]
    for g in held[1:]:
        np.testing.assert_array_equal(g, held[0])


def test_global_test_is_stratified_by_label_and_domain(digits: Dataset) -> None:
    p = make_partition(digits.y, digits.domain, 5, get_partitioner("iid", {}), 0, 0.3, 0.2)
    for label in range(10):
        for dom in range(4):
            cell = (digits.y == label) & (digits.domain == dom)
            held = cell[p.global_test].sum()
            assert held == round(0.3 * cell.sum()), (label, dom)


def test_global_test_hand_counts() -> None:
    # cells (label, domain): (0,0) 5 · (1,0) 9 · (0,1) 3 · (1,1) 2
    # 40 % of each, rounded: 2.0 → 2, 3.6 → 4, 1.2 → 1, 0.8 → 1
    labels = np.array([0] * 5 + [1] * 9 + [0] * 3 + [1] * 2)
    domains = np.array([0] * 14 + [1] * 5)
    p = make_partition(labels, domains, 2, get_partitioner("iid", {}), 0, 0.4, 0.0)
    g = p.global_test
    assert p.global_test.size == 8
    counts = {
        (lab, dom): int(((labels[g] == lab) & (domains[g] == dom)).sum())
        for lab in (0, 1)
        for dom in (0, 1)
    }
    assert counts == {(0, 0): 2, (1, 0): 4, (0, 1): 1, (1, 1): 1}
    assert sum(sizes(p)) == 19 - 8


@pytest.mark.parametrize(
    ("n", "fraction", "expected_sizes", "expected_tests"),
    [
        (13, 0.2, [4, 3, 3, 3], [1, 1, 1, 1]),  # 0.8 and 0.6 round to 1
        (13, 0.5, [4, 3, 3, 3], [2, 2, 2, 2]),  # 2.0, and 1.5 rounds to 2
        (13, 0.0, [4, 3, 3, 3], [0, 0, 0, 0]),  # no local test at all
        (5, 0.2, [2, 1, 1, 1], [1, 0, 0, 0]),  # ≥ 2 samples: at least one; 1 sample: none
        (40, 0.25, [10, 10, 10, 10], [2, 2, 2, 2]),  # 2.5 rounds half to even
    ],
)
def test_local_test_sizes(
    n: int, fraction: float, expected_sizes: list[int], expected_tests: list[int]
) -> None:
    p = make_partition(
        np.zeros(n, int), np.zeros(n, int), 4, get_partitioner("iid", {}), 0, 0.0, fraction
    )
    assert p.local_test_fraction == fraction
    assert sizes(p) == expected_sizes
    assert [c.test.size for c in p.clients] == expected_tests


def test_local_test_leaves_at_least_one_training_sample() -> None:
    p = make_partition(
        np.zeros(8, int), np.zeros(8, int), 4, get_partitioner("iid", {}), 0, 0.0, 0.75
    )
    assert all(c.train.size >= 1 for c in p.clients)


# ---------------------------------------------------------------------------------------------
# skew metrics


def test_identical_distributions_have_zero_skew() -> None:
    m = skew_metrics(np.array([[2, 4, 6], [1, 2, 3]]), np.array([[5, 5], [3, 3]]))
    assert m["label_js_mean"] == 0.0 and m["label_hellinger_mean"] == 0.0
    assert m["domain_js_mean"] == 0.0 and m["domain_hellinger_mean"] == 0.0
    assert m["domain_effective_mean"] == pytest.approx(2.0)
    # effective number of labels: exp(H(1/6, 2/6, 3/6))
    h = -sum(p * math.log(p) for p in (1 / 6, 2 / 6, 3 / 6))
    assert m["label_effective_mean"] == pytest.approx(math.exp(h), abs=1e-6)
    assert (m["size_min"], m["size_max"]) == (6, 12)
    assert m["size_cv"] == pytest.approx(3 / 9, abs=1e-6)  # std 3, mean 9


def test_disjoint_one_hot_clients_against_a_uniform_pool() -> None:
    # each client holds one of two labels; the pool is (1/2, 1/2); m = (3/4, 1/4)
    # JS² = ½·KL(p‖m) + ½·KL(q‖m) = ½·log2(4/3) + ½·(½·log2(2/3) + ½·log2(2)) = 0.311278
    # Hellinger² = ½·((1 − √½)² + (√½)²) = 1 − √½ = 0.292893
    m = skew_metrics(np.array([[5, 0], [0, 5]]), np.array([[5], [5]]))
    assert m["label_js_mean"] == pytest.approx(math.sqrt(0.311278), abs=1e-6)
    assert m["label_js_mean"] == pytest.approx(0.557923, abs=1e-6)
    assert m["label_hellinger_mean"] == pytest.approx(0.541196, abs=1e-6)
    assert m["label_effective_mean"] == pytest.approx(1.0)
    assert m["domain_js_mean"] == 0.0 and m["domain_effective_mean"] == pytest.approx(1.0)
    assert m["size_cv"] == 0.0


def test_js_and_hellinger_hand_values() -> None:
    one_hot = np.array([[1.0, 0.0, 0.0, 0.0]])
    uniform = np.full(4, 0.25)
    # JS² = ½·log2(8/5) + ½·(¼·log2(2/5) + ¾·1) = 0.548795;  Hellinger² = ½·(¼ + 3·¼ ) = ½
    assert js_distance(one_hot, uniform)[0] == pytest.approx(math.sqrt(0.548795), abs=1e-6)
    assert hellinger(one_hot, uniform)[0] == pytest.approx(math.sqrt(0.5))
    # disjoint supports are at the maximum distance, 1
    assert js_distance(np.array([[1.0, 0.0]]), np.array([0.0, 1.0]))[0] == pytest.approx(1.0)
    assert hellinger(np.array([[1.0, 0.0]]), np.array([0.0, 1.0]))[0] == pytest.approx(1.0)
    assert js_distance(one_hot, one_hot[0])[0] == 0.0


def test_iid_has_less_label_skew_than_dirichlet(digits: Dataset) -> None:
    iid = _run(digits, "iid", {})
    dirichlet = _run(digits, "dirichlet", {"alpha": 0.1})
    assert iid.metrics["label_js_mean"] < dirichlet.metrics["label_js_mean"]
    assert iid.metrics["label_effective_mean"] > dirichlet.metrics["label_effective_mean"]


# ---------------------------------------------------------------------------------------------
# usage errors


@pytest.mark.parametrize(
    ("scheme", "options", "flag"),
    [
        ("dirichlet", {"alpha": 0.0}, "--alpha"),
        ("dirichlet", {"alpha": -1.0}, "--alpha"),
        ("domain", {"alpha": 0.0}, "--alpha"),
        ("domain", {"domains_per_client": 0}, "--domains-per-client"),
        ("domain-label", {"alpha_domain": 0.0}, "--alpha-domain"),
        ("shards", {"shards_per_client": 0}, "--shards-per-client"),
        ("shards", {"classes_per_client": 0}, "--classes-per-client"),
        ("quantity", {"size_dist": "lognormal", "sigma": 0.0}, "--sigma"),
    ],
)
def test_non_positive_parameters(scheme: str, options: dict, flag: str) -> None:
    """The core names the parameter's key; the CLI words it as the option."""
    key = flag.lstrip("-").replace("-", "_")
    with pytest.raises(ParamError, match=f"^{key} must be > 0") as info:
        get_partitioner(scheme, options)
    assert info.value.key == key and info.value.as_option().startswith(f"{flag} must be > 0")
    assert (info.value.hint or "").startswith("for example ")


def test_unknown_size_distribution() -> None:
    with pytest.raises(UsageError, match="--size-dist must be one of dirichlet, lognormal"):
        get_partitioner("quantity", {"size_dist": "pareto"})


def test_more_clients_than_samples() -> None:
    with pytest.raises(UsageError, match="11 clients but only 10 samples"):
        split(np.zeros(10, int), np.zeros(10, int), 11, "iid")


def test_more_clients_than_samples_after_the_global_hold_out() -> None:
    with pytest.raises(UsageError, match="6 clients but only 5 samples") as info:
        make_partition(np.zeros(10, int), np.zeros(10, int), 6, get_partitioner("iid", {}), 0, 0.5)
    assert "--global-test" in (info.value.hint or "")


def test_min_size_too_large_for_the_pool() -> None:
    with pytest.raises(UsageError, match="5 clients × min size 3 needs 15 samples"):
        split(np.zeros(10, int), np.zeros(10, int), 5, "dirichlet", min_size=3)


def test_negative_min_size() -> None:
    with pytest.raises(ParamError, match=r"^min_size must be >= 0"):
        split(np.zeros(10, int), np.zeros(10, int), 2, "quantity", min_size=-1)


def test_too_many_shards() -> None:
    with pytest.raises(UsageError, match="4 clients × 3 shards exceeds the 10 samples"):
        split(np.zeros(10, int), np.zeros(10, int), 4, "shards", shards_per_client=3)


def test_more_classes_per_client_than_classes(digits: Dataset) -> None:
    with pytest.raises(UsageError, match="--classes-per-client 11 exceeds the 10 classes"):
        _run(digits, "shards", {"classes_per_client": 11})


@pytest.mark.parametrize("scheme", ["domain", "domain-label"])
def test_more_domains_per_client_than_domains(digits: Dataset, scheme: str) -> None:
    with pytest.raises(UsageError, match="--domains-per-client 5 exceeds the 4 domains"):
        _run(digits, scheme, {"domains_per_client": 5})


@pytest.mark.parametrize("scheme", ["domain", "domain-label"])
def test_domain_schemes_need_domains(scheme: str) -> None:
    labels = np.tile(np.arange(2), 10)
    with pytest.raises(UsageError, match="no domain information") as info:
        make_partition(
            labels, np.zeros(20, int), 2, get_partitioner(scheme, {}), 0, has_domains=False
        )
    assert "--domain-column" in (info.value.hint or "")
    with pytest.raises(UsageError, match="at least 2 domains; this dataset has 1"):
        make_partition(labels, np.zeros(20, int), 2, get_partitioner(scheme, {}), 0)


def test_option_not_used_by_the_scheme() -> None:
    with pytest.raises(UsageError) as info:
        get_partitioner("iid", {"alpha": 0.5})
    assert str(info.value) == "option --alpha is not used by scheme 'iid' (its options: none)"
    with pytest.raises(UsageError) as info:
        get_partitioner("shards", {"min_size": 2})
    assert str(info.value) == (
        "option --min-size is not used by scheme 'shards' "
        "(its options: --shards-per-client, --classes-per-client)"
    )


def test_unknown_scheme_suggests_the_nearest() -> None:
    with pytest.raises(UsageError) as info:
        get_partitioner("dirichet", {})
    assert str(info.value) == "unknown scheme 'dirichet' (did you mean 'dirichlet'?)"
    assert info.value.hint == f"choose one of {', '.join(PARTITIONERS)}"
    with pytest.raises(UsageError) as info:
        get_partitioner("zzz", {})
    assert str(info.value) == "unknown scheme 'zzz'"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_clients": 0}, "--clients must be >= 1, got 0"),
        ({"global_test_fraction": 1.0}, "--global-test must be in [0, 1), got 1.0"),
        ({"local_test_fraction": -0.1}, "--local-test must be in [0, 1), got -0.1"),
    ],
)
def test_pipeline_argument_errors(kwargs: dict, message: str) -> None:
    args: dict = {"num_clients": 2, "partitioner": get_partitioner("iid", {}), "seed": 0}
    with pytest.raises(ParamError) as info:
        make_partition(np.zeros(10, int), np.zeros(10, int), **{**args, **kwargs})
    assert info.value.as_option() == message


# ---------------------------------------------------------------------------------------------
# allocation helpers


def test_small_uint_picks_the_smallest_type() -> None:
    v = np.arange(3)
    assert small_uint(v, 255).dtype == np.uint8
    assert small_uint(v, 256).dtype == np.uint16
    assert small_uint(v, 65_535).dtype == np.uint16
    assert small_uint(v, 65_536).dtype == np.uint32


def test_reserve_gives_each_client_exactly_min_size() -> None:
    owner = reserve(20, 3, 4, np.random.default_rng(0))
    assert np.bincount(owner[owner >= 0]).tolist() == [4, 4, 4]
    assert (owner == -1).sum() == 8
    assert (reserve(20, 3, 0, np.random.default_rng(0)) == -1).all()


def test_allocate_by_key_one_hot_shares_are_exact() -> None:
    keys = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 2])
    shares = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])  # key k → client
    owner = np.full(10, -1)
    owner[9] = 1  # already owned (a reserve): must keep its owner
    before = owner.copy()
    out = allocate_by_key(keys, shares, owner, np.random.default_rng(0))
    np.testing.assert_array_equal(owner, before)  # the argument is not modified
    assert out.tolist() == [1, 2, 0, 1, 2, 0, 1, 2, 0, 1]


def test_allocate_by_key_exact_per_key_totals() -> None:
    rng = np.random.default_rng(1)
    keys = rng.integers(0, 5, size=500)
    shares = dirichlet_shares(5, 7, 0.5, rng)  # (5, 7)
    shares[2] = [0.5, 0.5, 0, 0, 0, 0, 0]  # key 2 only on clients 0 and 1
    owner = reserve(500, 7, 3, rng)
    out = allocate_by_key(keys, shares, owner, rng)
    assert (out >= 0).all() and (out < 7).all()
    np.testing.assert_array_equal(out[owner >= 0], owner[owner >= 0])
    free = owner < 0
    table = np.zeros((5, 7), int)
    np.add.at(table, (keys[free], out[free]), 1)
    # every key's free samples are all allocated, and only to clients with a share of the key
    np.testing.assert_array_equal(table.sum(axis=1), np.bincount(keys[free], minlength=5))
    assert (table[2, 2:] == 0).all()


def test_allocate_even_hand_counts() -> None:
    keys = np.array([0] * 7 + [1] * 4 + [2] * 3)
    shares = np.array(
        [
            [1 / 3, 0.0, 1 / 3, 1 / 3],  # key 0: 7 samples over clients 0, 2, 3 → 3, 2, 2
            [0.0, 1.0, 0.0, 0.0],  # key 1: all 4 to client 1
            [0.0, 0.0, 0.0, 0.0],  # key 2: no holder → unassigned
        ]
    )
    out = allocate_even(keys, shares, np.random.default_rng(0))
    table = np.zeros((3, 4), int)
    np.add.at(table, (keys[out >= 0], out[out >= 0]), 1)
    assert table.tolist() == [[3, 0, 2, 2], [0, 4, 0, 0], [0, 0, 0, 0]]
    assert (out[keys == 2] == -1).all()


def test_keys_per_client_shares() -> None:
    shares = keys_per_client_shares(4, 6, 2, np.random.default_rng(0))  # (K, N)
    assert shares.shape == (4, 6)
    assert ((shares > 0).sum(axis=0) == 2).all()  # each client holds exactly 2 keys
    np.testing.assert_allclose(shares.sum(axis=1), 1.0)  # N ≥ K: every key has a holder
    for row in shares:
        held = row[row > 0]
        np.testing.assert_allclose(held, 1.0 / held.size)  # split evenly among holders
    few = keys_per_client_shares(5, 2, 1, np.random.default_rng(0))  # 2 clients, 5 keys
    assert sorted(few.sum(axis=1).tolist()) == [0.0, 0.0, 0.0, 1.0, 1.0]


def test_dirichlet_shares_rows_are_distributions() -> None:
    shares = dirichlet_shares(3, 5, 0.3, np.random.default_rng(0))
    assert shares.shape == (3, 5)
    assert (shares >= 0).all()
    np.testing.assert_allclose(shares.sum(axis=1), 1.0)
