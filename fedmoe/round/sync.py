"""FedMoE-DA's side of a round (arXiv 2411.02115, Eq. 8–11 and Sec. III-C).

The server holds the latest proxies of every client (stale ones of clients that sat rounds out are
kept and marked, unless the method drops them). Every I rounds it recomputes each MoE layer's
matrix A over all of them (Eq. 9–10); in between it reuses A. In a round, only the rows of
participating clients are applied, with sources from participating clients, renormalised
(:func:`fedmoe.plan.matrix.restrict`); those rows give the peer-to-peer transfers and the ledger.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedmoe.affinity import Affinity, Upload
from fedmoe.aggregate.fedmoe_da import FedMoEDA, GateMode, Interval, StaleProxies
from fedmoe.errors import InputError
from fedmoe.model.schema import PartSizes
from fedmoe.plan import (
    AggregationMatrix,
    Ledger,
    Transfers,
    aggregation_matrix,
    client_prior,
    csls,
    drop_small,
    restrict,
    traffic_ledger,
    transfer_table,
)


@dataclass(frozen=True)
class SyncPlan:
    """The plan of one FedMoE-DA round: what ``plan-sync`` writes and the server sends."""

    round: int  # the round it is for
    matrix_round: int  # the round whose affinity built the matrices (< round when reused)
    method: FedMoEDA  # P, τ, I, gate mode, interval reading
    matrices: tuple[AggregationMatrix, ...]  # A of each MoE layer over every held client
    participants: tuple[int, ...]  # clients whose rows apply this round, increasing
    transfers: Transfers  # expert fetches of the applied rows, by (sender, receiver, layer)
    ledger: Ledger  # the round's traffic

    @property
    def refreshed(self) -> bool:
        """True when the matrices were recomputed for this round."""
        return self.matrix_round == self.round

    @property
    def merges_experts(self) -> bool:
        """Whether experts are synchronised this round (always, unless ``interval: sync``)."""
        return self.method.interval is Interval.MATRIX or self.refreshed

    def applied(self) -> tuple[AggregationMatrix, ...]:
        """The rows applied this round (participating targets and sources), per layer."""
        return tuple(restrict(m, self.participants) for m in self.matrices)


def held_uploads(
    previous: Mapping[int, Upload], fresh: Mapping[int, Upload], stale: StaleProxies
) -> dict[int, Upload]:
    """The uploads the server holds after a round: each client's latest by round (``fresh`` wins a
    tie); with ``drop``, only the fresh ones."""
    if stale is StaleProxies.DROP:
        return dict(sorted(fresh.items()))
    held = dict(previous)
    for c, up in fresh.items():
        old = held.get(c)
        if old is None or up.round >= old.round:
            held[c] = up
    return dict(sorted(held.items()))


def build_matrices(
    affinity: Affinity,
    top_p: int,
    tau: float,
    min_weight: float = 0.0,
    top_clients: int = 0,
    csls_k: int = 0,
) -> tuple[AggregationMatrix, ...]:
    """Eq. 9–10 for each MoE layer of ``affinity`` (similarities corrected for hubness with
    ``csls_k`` neighbours, candidates limited to the ``top_clients`` most similar clients,
    sources under ``min_weight`` dropped; each off at 0)."""
    out = []
    for layer in affinity.layers:
        scored = csls(layer.neighbours, csls_k)
        near = client_prior(scored, layer.index, top_clients)
        out.append(drop_small(aggregation_matrix(near, layer.index, top_p, tau), min_weight))
    return tuple(out)


def _plan_bytes(
    applied: tuple[AggregationMatrix, ...], participants: tuple[int, ...]
) -> dict[int, int]:
    """Bytes of each participant's plan rows as compact JSON (what the server sends it): the
    length of ``json.dumps(rows, separators=(",", ":"))`` with one ``[layer, expert, source
    client, source expert, weight]`` entry per source, counted without building the text."""
    total = np.zeros(len(participants), dtype=np.int64)
    count = np.zeros(len(participants), dtype=np.int64)
    position = {c: i for i, c in enumerate(participants)}
    powers = 10 ** np.arange(1, 19, dtype=np.int64)

    def digits(x: np.ndarray) -> np.ndarray:  # decimal digits of non-negative integers
        return 1 + np.searchsorted(powers, x, side="right")

    for layer, m in enumerate(applied):
        index, e = m.index, m.index.num_experts
        if not m.sources.size:
            continue
        clients = np.asarray(index.clients, dtype=np.int64)
        targets = m.targets
        owner = np.asarray([position[c] for c in index.clients], dtype=np.int64)[targets // e]
        width = (
            6  # the entry's brackets and four commas
            + len(str(layer))
            + digits(targets % e)
            + digits(clients[m.sources // e])
            + digits(m.sources % e)
            + np.fromiter((len(repr(w)) for w in m.weights.tolist()), np.int64, m.weights.size)
        )
        total += np.bincount(owner, weights=width, minlength=len(participants)).astype(np.int64)
        count += np.bincount(owner, minlength=len(participants))
    sizes = 2 + total + np.maximum(count - 1, 0)  # the list's brackets and the commas between
    return {c: int(sizes[i]) for i, c in enumerate(participants)}


def plan_sync(
    matrices: tuple[AggregationMatrix, ...],
    matrix_round: int,
    round_: int,
    participants: tuple[int, ...] | list[int],
    method: FedMoEDA,
    sizes: PartSizes,
) -> SyncPlan:
    """The sync plan of ``round_`` from the matrices in force.

    Parameters
    ----------
    matrices
        A of each MoE layer (fresh for this round, or reused within the refresh interval).
    matrix_round
        The round whose affinity built ``matrices``.
    round_
        This round.
    participants
        Clients that trained this round; one the matrices do not cover (it had not uploaded when
        they were built) keeps its experts until the next refresh.
    method
        FedMoE-DA's parameters.
    sizes
        Byte sizes of the model's parts.
    """
    present = tuple(sorted(int(c) for c in participants))
    if not present:
        raise InputError("the round has no participant to plan for")
    if len(matrices) != len(sizes.expert):
        raise InputError(
            f"{len(matrices)} matrices for a model with {len(sizes.expert)} MoE layers"
        )
    plan = SyncPlan(
        round_, matrix_round, method, tuple(matrices), present, Transfers.empty(), _EMPTY
    )
    applied = plan.applied()
    transfers = Transfers.concat(
        [
            transfer_table(m, sizes.expert_on_wire(layer, method.wire.itemsize), layer)
            for layer, m in enumerate(applied)
        ]
        if plan.merges_experts
        else []
    )
    ledger = traffic_ledger(
        sizes,
        list(present),
        transfers,
        _plan_bytes(applied, present) if plan.merges_experts else {},
        method.gate is GateMode.SHARED,
    )
    return SyncPlan(round_, matrix_round, method, tuple(matrices), present, transfers, ledger)


_EMPTY = Ledger(0, 0, 0, 0, 0, 0, 0)
