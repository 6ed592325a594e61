"""The aggregation contract: what the server knows of a round (:class:`RoundInputs`), what a method
makes of it (a :class:`MergeSpec`), and the base class every method implements.

A merge spec is made of *groups*: a group's reduction is computed once, from its sources, and given
to every member. FedAvg is one group whose members are every client of the federation (those that
sat the round out included, as FedAvg gives its new model to everyone); the oracle is one group per
true domain; FedMoE-DA is one group for the shared parts and, for the experts, the sparse matrix of
Eq. 9–11. A client that is in no group of a part keeps its own copy of that part. Each group
carries a reduce kind (:mod:`fedmoe.aggregate.reduce`): the weighted mean, or a robust statistic.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fedmoe.affinity.proxies import Upload
from fedmoe.aggregate.defence import ExpertDefence
from fedmoe.aggregate.reduce import Reduce
from fedmoe.errors import InputError
from fedmoe.model.schema import ModelSchema, Role
from fedmoe.params import check_params, help_of
from fedmoe.plan.matrix import AggregationMatrix
from fedmoe.train.config import TrainConfig


@dataclass(frozen=True)
class RoundInputs:
    """Everything a method may use to plan one round's merge."""

    round: int  # this round's number
    schema: ModelSchema  # the roles of the model's tensors
    clients: tuple[int, ...]  # every client of the federation, increasing: each gets a model
    uploads: Mapping[int, Upload]  # this round's participants
    groups: Mapping[int, int] = dataclasses.field(default_factory=dict)  # true domains (oracle)
    matrices: tuple[AggregationMatrix, ...] | None = None  # FedMoE-DA: A of each MoE layer
    matrix_round: int | None = None  # FedMoE-DA: the round whose affinity built ``matrices``

    def __post_init__(self) -> None:
        if list(self.clients) != sorted(set(self.clients)):
            raise InputError("the round's clients must be increasing and distinct")
        strangers = sorted(set(self.uploads) - set(self.clients))
        if strangers:
            raise InputError(f"client {strangers[0]} uploaded but is not among the round's clients")

    @property
    def participants(self) -> tuple[int, ...]:
        """Clients that trained and uploaded this round, increasing."""
        return tuple(sorted(self.uploads))


@dataclass(frozen=True)
class Group:
    """One reduction: computed once from ``sources`` and given to every member."""

    members: tuple[int, ...]  # clients that receive the result
    sources: tuple[int, ...]  # clients whose tensors are reduced (participants only)
    weights: tuple[float, ...]  # one per source, summing to 1 (weighted reduce kinds)


@dataclass(frozen=True)
class ExpertGroup:
    """A same-index expert reduction: expert j of every member ← reduce of expert j over sources,
    with per-expert weights (rows of ``weights``)."""

    members: tuple[int, ...]
    sources: tuple[int, ...]
    weights: tuple[tuple[float, ...], ...]  # (E, S): row j weighs the sources' expert j


@dataclass(frozen=True)
class SameIndex:
    """Experts of one MoE layer merged index by index, within groups."""

    groups: tuple[ExpertGroup, ...]


@dataclass(frozen=True)
class CrossExpert:
    """Experts of one MoE layer merged by Eq. 11: θ_(i,j) ← Σ a_(i,j),(i',j') θ_(i',j') over the
    rows of ``matrix`` (targets not in the matrix keep their experts)."""

    matrix: AggregationMatrix  # the applied rows: present targets, present sources
    defence: ExpertDefence = ExpertDefence()  # noqa: RUF009  frozen; default: Eq. 11 itself
    wire: str | None = None  # torch dtype remote sources are rounded to (FedMoEDA.wire), or none


LayerMerge = SameIndex | CrossExpert | None  # None: every client keeps its experts of this layer


@dataclass(frozen=True)
class MergeSpec:
    """How every client's output model is built from the round's models."""

    method: str  # the method's name
    clients: tuple[int, ...]  # every client that receives an output model
    shared: tuple[Group, ...]  # shared tensors (embedding, heads, norms)
    gate: tuple[Group, ...]  # gate tensors; a client in no group keeps its own gate
    experts: tuple[LayerMerge, ...]  # one per MoE layer
    reduce: Reduce = Reduce()  # how a group's sources are combined

    def group_of(self, part: tuple[Group, ...], client: int) -> int | None:
        """Index of the group of ``part`` that ``client`` belongs to, or None."""
        for g, group in enumerate(part):
            if client in group.members:
                return g
        return None


def sample_weights(uploads: list[Upload]) -> tuple[float, ...]:
    """FedAvg weights n_i / Σ n (uniform when every count is zero)."""
    counts = np.array([max(u.num_samples, 0) for u in uploads], dtype=np.float64)
    total = counts.sum()
    w = counts / total if total > 0 else np.full(len(uploads), 1.0 / max(len(uploads), 1))
    return tuple(float(x) for x in w)


def fedavg_group(members: tuple[int, ...], uploads: list[Upload]) -> Group:
    """One sample-weighted group over ``uploads``."""
    return Group(members, tuple(u.client for u in uploads), sample_weights(uploads))


def same_index_group(group: Group, num_experts: int) -> ExpertGroup:
    """The expert group of ``group``: every expert j weighted like the group."""
    return ExpertGroup(group.members, group.sources, (group.weights,) * num_experts)


def whole_model_spec(
    name: str, inputs: RoundInputs, part: tuple[Group, ...], reduce: Reduce
) -> MergeSpec:
    """Every part of the model reduced within each group of ``part`` (experts index by index):
    FedAvg (one group), the oracle (a group per true domain), IFCA (a group per cluster)."""
    experts = tuple(
        SameIndex(tuple(same_index_group(g, e) for g in part)) for e in inputs.schema.num_experts
    )
    return MergeSpec(name, inputs.clients, part, part, tuple(experts), reduce)


class Aggregator(ABC):
    """Base class of the methods: a frozen dataclass whose fields are its parameters (declared
    with :func:`fedmoe.params.param`), a registry ``name`` and a one-line ``summary``."""

    name: ClassVar[str]
    summary: ClassVar[str]
    uses_matrix: ClassVar[bool] = False  # needs FedMoE-DA's matrices in the round inputs
    uses_clusters: ClassVar[bool] = False  # clustered FL: the engine keeps k cluster models
    # the parts a participant sends the server and gets back (FedMoE-DA's experts go peer to peer
    # and are counted by its own ledger): the server ledger and the Flower upload follow this
    moves: ClassVar[frozenset[Role]] = frozenset(Role)

    def __post_init__(self) -> None:
        check_params(self)

    @classmethod
    def parameters(cls) -> dict[str, str]:
        """Parameter name → help text."""
        return {f.name: help_of(cls, f.name) for f in dataclasses.fields(cls)}  # type: ignore[arg-type]

    def local_training(self, base: TrainConfig) -> TrainConfig:
        """The local training this method asks of its clients, given the run's (default:
        unchanged; FedProx adds its proximal term). Every engine trains with what this returns."""
        return base

    @abstractmethod
    def spec(self, inputs: RoundInputs) -> MergeSpec:
        """The merge this method performs for ``inputs``."""
