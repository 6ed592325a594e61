"""FedMoE-DA aggregation (Zhan et al., arXiv 2411.02115): sample-weighted FedAvg of the embedding
(and of the gate when shared), and the experts of every MoE layer merged by Eq. 11 over that
layer's sparse matrix A of Eq. 9–10.

Partial participation (the paper uses every client every round; our reading): the round's merge
applies only the rows of A whose target client took part, and only their sources from clients that
took part (an absent client is not contacted), renormalised over those sources. The new shared
parts go to every client, so a client that sat out starts its next round from the latest server
parts plus its own experts. With ``interval: sync`` (the paper's other reading of I), experts are
merged only in rounds where A is recomputed.

Against malicious peers (beyond the paper, which trusts every peer): the shared parts may use a
robust reduce kind (``reduce``), and each target may defend its own row of A
(``expert_reduce``, ``expert_bound``, ``expert_outlier``, ``expert_trust``; :mod:`fedmoe.aggregate.defence`). All
off by default: the paper's method.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fedmoe.aggregate.base import (
    Aggregator,
    CrossExpert,
    Group,
    MergeSpec,
    RoundInputs,
    fedavg_group,
)
from fedmoe.aggregate.defence import ExpertDefence
from fedmoe.aggregate.reduce import Reduce, ReduceKind
from fedmoe.aggregate.robust import ReduceParams
from fedmoe.errors import InputError
from fedmoe.model.schema import Role
from fedmoe.params import param
from fedmoe.plan.matrix import AggregationMatrix, restrict


class GateMode(str, enum.Enum):
    """Whether the server averages the gate (open point of the method; README: measured)."""

    PER_CLIENT = "per-client"  # each client keeps its own gate: its rows say what its experts do
    SHARED = "shared"  # the gate is averaged with the embedding


class SharedMix(str, enum.Enum):
    """Whom a client's shared parts are averaged with (beyond the paper: an option)."""

    GLOBAL = "global"  # the paper: FedAvg of the shared parts over every client
    AFFINITY = "affinity"  # the clients its experts draw on, in the proportions of A's rows


class StaleProxies(str, enum.Enum):
    """What the server does with the proxies of clients that sat a round out."""

    KEEP = "keep"  # they stay in the matrix, marked stale, until the client uploads again
    DROP = "drop"  # only the round's participants enter the matrix


class Interval(str, enum.Enum):
    """The two readings of the refresh interval I."""

    MATRIX = "matrix"  # A recomputed every I rounds, reused in between; experts merge every round
    SYNC = "sync"  # experts synchronised (and A recomputed) only every I rounds


class Wire(str, enum.Enum):
    """The precision of experts sent peer to peer (beyond the paper, which sends them as they
    are): a remote source is rounded to it before the float64 merge, and the ledger counts its
    bytes. A client's own experts never travel and are never rounded."""

    NATIVE = "native"  # as stored (the paper)
    BF16 = "bf16"  # bfloat16: float32's range, 8 bits of mantissa
    FP16 = "fp16"  # float16: 11 bits of mantissa, range to 65,504

    @property
    def itemsize(self) -> int | None:
        """Bytes per value on the wire (``None``: as stored)."""
        return None if self is Wire.NATIVE else 2

    @property
    def dtype_name(self) -> str | None:
        """The torch dtype a remote expert is rounded to (``None``: as stored)."""
        return {Wire.BF16: "bfloat16", Wire.FP16: "float16"}.get(self)


@dataclass(frozen=True, kw_only=True)
class FedMoEDA(ReduceParams, Aggregator):
    """Eq. 11 over each MoE layer's matrix; FedAvg of the shared parts."""

    name: ClassVar[str] = "fedmoe-da"
    summary: ClassVar[str] = "domain-aware expert merge by the sync plan (FedMoE-DA Eq. 9-11)"
    moves: ClassVar[frozenset[Role]] = frozenset((Role.SHARED, Role.GATE))  # experts: peer to peer
    uses_matrix: ClassVar[bool] = True

    top_p: int = param(4, "P: similar client-experts kept besides the target itself", ge=0)
    tau: float = param(0.1, "softmax temperature τ over the kept set", gt=0.0)
    top_clients: int = param(
        0,
        "choose each expert's sources among the experts of its own client and of this many most"
        " similar clients (client similarity: mean best expert similarity; 0: off, the paper)",
        ge=0,
    )
    min_weight: float = param(
        0.0,
        "drop sources (other than the target's own expert) whose weight in a row of A is below"
        " this, renormalising the row (less peer-to-peer traffic; 0: the paper's Eq. 9-10)",
        ge=0.0,
        lt=1.0,
    )
    csls: int = param(
        0,
        "hubness correction (CSLS, Conneau et al. 2018): rank sources by similarity minus half"
        " the target's and the source's mean similarity to their k nearest other experts, so"
        " experts close to everyone (crafted near the mean: ALIE, mimicry) lose rank; k (0: off,"
        " the paper)",
        ge=0,
    )
    wire: Wire = param(
        Wire.NATIVE,
        "precision of the experts sent peer to peer: native (as stored, the paper), bf16 or"
        " fp16 (a remote source is rounded to it before the float64 merge; half the bytes)",
    )
    refresh_interval: int = param(1, "I: recompute A every I rounds", ge=1)
    gate: GateMode = param(GateMode.PER_CLIENT, "per-client (each keeps its gate) or shared")
    candidates: int = param(16, "neighbours kept per client-expert by the affinity pass", ge=1)
    shared: SharedMix = param(
        SharedMix.GLOBAL,
        "global (paper: FedAvg of the shared parts) or affinity (each client averages them with"
        " the clients its experts draw on, weighted as in its rows of A)",
    )
    pool_layers: bool = param(
        False,
        "one matrix for every MoE layer, from expert j's gate rows of all layers together"
        " (for experts that serve one domain in every layer)",
    )
    centred: bool = param(
        False,
        "choose each expert's sources among the same expert of other clients by the cosine of"
        " gate rows centred on that expert's median row, so rows near everyone's centre (ALIE"
        " uploads) lose rank; Eq. 10 still weighs the plain cosine",
    )
    stale: StaleProxies = param(
        StaleProxies.KEEP, "keep or drop the proxies of clients that sat the round out"
    )
    interval: Interval = param(
        Interval.MATRIX, "matrix: reuse A between refreshes; sync: merge experts only on refresh"
    )
    expert_reduce: ReduceKind = param(
        ReduceKind.MEAN,
        "how a target combines its sources: mean (Eq. 11), median, trimmed-mean, clipped-mean or"
        " multi-krum",
    )
    expert_bound: float = param(
        0.0,
        "bound each source's difference from the target's own expert to this share of its"
        " norm (0: off)",
        ge=0.0,
    )
    expert_outlier: float = param(
        0.0,
        "down-weight sources farther than this many median distances from the row's"
        " coordinate-wise median (0: off)",
        ge=0.0,
    )

    expert_trust: bool = param(
        False,
        "weigh each source by the cosine between its move from the target's start and the"
        " target's own update (FLTrust-style; needs each target's start model)",
    )

    def defence(self) -> ExpertDefence:
        """How each target combines its row of A (:mod:`fedmoe.aggregate.defence`)."""
        return ExpertDefence(
            Reduce(self.expert_reduce, self.trim, self.clip, self.krum_ratio),
            self.expert_bound,
            self.expert_outlier,
            self.expert_trust,
        )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.candidates < self.top_p + 1:
            from fedmoe.errors import ParamError

            raise ParamError(
                "candidates", self.candidates, f"must be >= top_p + 1 = {self.top_p + 1}"
            )

    def refresh_due(self, round_: int, matrix_round: int | None) -> bool:
        """Whether A is recomputed in ``round_`` (given the round that built the current A)."""
        return matrix_round is None or round_ - matrix_round >= self.refresh_interval

    def spec(self, inputs: RoundInputs) -> MergeSpec:
        if inputs.matrices is None:
            raise InputError(
                "fedmoe-da needs the round's aggregation matrices",
                hint="build them with fedmoe plan-sync and pass --plan",
            )
        if len(inputs.matrices) != inputs.schema.num_layers:
            raise InputError(
                f"the sync plan has {len(inputs.matrices)} matrices for a model with "
                f"{inputs.schema.num_layers} MoE layers"
            )
        present = inputs.participants
        group = fedavg_group(inputs.clients, [inputs.uploads[c] for c in present])
        merge = self.interval is Interval.MATRIX or inputs.matrix_round == inputs.round
        applied = tuple(restrict(m, present) for m in inputs.matrices)
        experts = tuple(
            CrossExpert(m, self.defence(), self.wire.dtype_name) if merge else None for m in applied
        )
        shared: tuple[Group, ...] = (group,)
        if self.shared is SharedMix.AFFINITY:
            shared = client_groups(applied)
        return MergeSpec(
            self.name,
            inputs.clients,
            shared,
            shared if self.gate is GateMode.SHARED else (),
            experts,
            self.reducer(),
        )


def client_groups(matrices: tuple[AggregationMatrix, ...]) -> tuple[Group, ...]:
    """One group per target client of the applied matrices: its sources are the clients its
    experts draw on, each weighted by the mean over its rows (every expert of every MoE layer) of
    the weight the row gives that client's experts. Each row of A sums to one, so the client
    weights do too; the target itself is always among them (Eq. 9–10 keep its own expert)."""
    index = matrices[0].index
    n, e = len(index.clients), index.num_experts
    keys, mass = [], []
    for m in matrices:
        keys.append((m.targets // e) * n + m.sources // e)  # (target client, source client)
        mass.append(m.weights / (e * len(matrices)))
    flat, inverse = np.unique(np.concatenate(keys), return_inverse=True)
    total = np.bincount(inverse, weights=np.concatenate(mass))
    bounds = np.searchsorted(flat // n, np.arange(n + 1))  # ``flat`` is sorted by target
    groups = []
    for t in range(n):
        src, w = flat[bounds[t] : bounds[t + 1]] % n, total[bounds[t] : bounds[t + 1]]
        w = w / w.sum()
        groups.append(
            Group((index.clients[t],), tuple(index.clients[int(s)] for s in src),
                  tuple(float(x) for x in w))
        )  # fmt: skip
    return tuple(groups)
