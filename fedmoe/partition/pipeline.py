"""From a dataset to a federated partition: hold out a global test set, let a scheme assign the
pool to clients, split each client into local train/test, and measure the skew.

Randomness: one seed makes a ``SeedSequence`` that spawns one generator per step (hold-out,
scheme, local split), so changing a scheme never changes the global test set of the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fedmoe.errors import ParamError, UsageError
from fedmoe.partition.allocate import small_uint
from fedmoe.partition.base import Partitioner, PoolInfo
from fedmoe.partition.metrics import skew_metrics


@dataclass(frozen=True)
class ClientSplit:
    """One client's samples: indices into the dataset, ascending."""

    train: np.ndarray  # (n_train,) int64
    test: np.ndarray  # (n_test,) int64, the local (personalised) test split


@dataclass(frozen=True)
class Partition:
    """A federated split of one dataset."""

    scheme: str  # registry name of the partitioner
    params: dict[str, Any]  # the partitioner's effective options
    seed: int  # the one seed every generator derives from
    global_test_fraction: float  # share of each (label, domain) cell held out for global test
    local_test_fraction: float  # share of each client held out as its local test split
    clients: tuple[ClientSplit, ...]  # one per client, client id = position
    global_test: np.ndarray  # (n_global,) int64 indices of the global test set
    unassigned: np.ndarray  # (n_unassigned,) pool indices that no client received
    label_counts: np.ndarray  # (N, C) per-client label counts (train + test)
    domain_counts: np.ndarray  # (N, D) per-client domain counts (train + test)
    metrics: dict[str, float]  # skew metrics, see fedmoe.partition.metrics


GLOBAL_TEST = 0.2  # default share held out as the global test set (the CLI and recipes read it)
LOCAL_TEST = 0.2  # default share of each client kept as its local test split
NUM_CLIENTS = 20  # default number of clients


def _check_fraction(value: float, key: str) -> None:
    if not 0.0 <= value < 1.0:
        raise ParamError(key, value, "must be in [0, 1)", hint="for example 0.2")


def hold_out(
    labels: np.ndarray, domains: np.ndarray, fraction: float, rng: np.random.Generator
) -> np.ndarray:
    """Stratified hold-out: ``round(fraction · n_cell)`` indices of each (label, domain) cell."""
    n = labels.shape[0]
    if fraction == 0.0:
        return np.empty(0, dtype=np.int64)
    num_cells = int((domains.max() + 1) * (labels.max() + 1))
    cell = domains * (labels.max() + 1) + labels  # (n,)
    perm = rng.permutation(n)
    grouped = perm[np.argsort(small_uint(cell[perm], num_cells), kind="stable")]
    per_cell = np.bincount(cell, minlength=num_cells)  # (cells,)
    take = np.rint(per_cell * fraction).astype(np.int64)  # (cells,)
    starts = np.cumsum(per_cell) - per_cell  # (cells,)
    rank = np.arange(n) - np.repeat(starts, per_cell)  # (n,) position inside its cell
    chosen = grouped[rank < np.repeat(take, per_cell)]
    return np.sort(chosen)


def make_partition(
    labels: np.ndarray,
    domains: np.ndarray,
    num_clients: int,
    partitioner: Partitioner,
    seed: int,
    global_test_fraction: float = GLOBAL_TEST,
    local_test_fraction: float = LOCAL_TEST,
    has_domains: bool = True,
) -> Partition:
    """Split a dataset into ``num_clients`` clients with ``partitioner``.

    Parameters
    ----------
    labels, domains
        (n,) int label and domain ids of the whole dataset.
    num_clients
        N ≥ 1.
    partitioner
        The scheme.
    seed
        The one seed; the same seed and inputs give the same partition, bit for bit.
    global_test_fraction, local_test_fraction
        Shares held out for the global test set (stratified by label × domain) and for each
        client's local test split (at least one sample when the client has two or more, and never
        the client's last training sample).
    has_domains
        Whether ``domains`` carries real domain ids (domain schemes refuse data without them).

    Returns
    -------
    Partition
    """
    if seed < 0:
        raise ParamError("seed", seed, "must be >= 0", hint="for example 0")
    if num_clients < 1:
        raise ParamError("clients", num_clients, "must be >= 1")
    _check_fraction(global_test_fraction, "global_test")
    _check_fraction(local_test_fraction, "local_test")
    labels = np.asarray(labels, dtype=np.int64)
    domains = np.asarray(domains, dtype=np.int64)
    n = labels.shape[0]
    num_classes = int(labels.max()) + 1 if n else 1
    num_domains = int(domains.max()) + 1 if n else 1
    g_hold, g_assign, g_split = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)
    )

    global_test = hold_out(labels, domains, global_test_fraction, g_hold)
    in_pool = np.ones(n, dtype=bool)
    in_pool[global_test] = False
    pool = np.flatnonzero(in_pool)  # (n_pool,) dataset indices
    info = PoolInfo(pool.shape[0], num_classes, num_domains, has_domains)
    if num_clients > info.num_samples:
        raise UsageError(
            f"{num_clients} clients but only {info.num_samples} samples after the global test "
            "hold-out",
            hint=f"use at most {info.num_samples} clients or a smaller --global-test",
        )
    partitioner.check(info, num_clients)
    owner = partitioner.assign(labels[pool], domains[pool], num_clients, g_assign)  # (n_pool,)

    assigned = owner >= 0
    unassigned = pool[~assigned]
    members, owners = pool[assigned], owner[assigned]
    shuffle = g_split.permutation(members.shape[0])
    narrow = small_uint(owners, num_clients)  # narrow first: the gather moves 2 bytes an owner
    order = shuffle[np.argsort(narrow[shuffle], kind="stable")]
    members = members[order]  # grouped by client, random order inside each
    sizes = np.bincount(owners, minlength=num_clients)  # (N,)
    n_test = np.where(sizes >= 2, np.maximum(np.rint(sizes * local_test_fraction), 1), 0)
    n_test = np.where(local_test_fraction > 0, np.minimum(n_test, sizes - 1), 0).astype(np.int64)
    clients = []
    for i, part in enumerate(np.split(members, np.cumsum(sizes)[:-1])):
        clients.append(
            ClientSplit(train=np.sort(part[n_test[i] :]), test=np.sort(part[: n_test[i]]))
        )

    client_of = np.repeat(np.arange(num_clients), sizes)  # (n_members,)
    label_counts = np.bincount(
        client_of * num_classes + labels[members], minlength=num_clients * num_classes
    ).reshape(num_clients, num_classes)
    domain_counts = np.bincount(
        client_of * num_domains + domains[members], minlength=num_clients * num_domains
    ).reshape(num_clients, num_domains)
    return Partition(
        scheme=partitioner.name,
        params=partitioner.params(),
        seed=seed,
        global_test_fraction=global_test_fraction,
        local_test_fraction=local_test_fraction,
        clients=tuple(clients),
        global_test=global_test,
        unassigned=np.sort(unassigned),
        label_counts=label_counts,
        domain_counts=domain_counts,
        metrics=skew_metrics(label_counts, domain_counts),
    )
