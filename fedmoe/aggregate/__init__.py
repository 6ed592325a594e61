"""Aggregation: the contract (:mod:`~fedmoe.aggregate.base`), one method per file registered in
:data:`AGGREGATORS`, the reduce kinds, the engine that applies a merge to checkpoints or tensors,
and a plain linear merge of any safetensors files."""

from fedmoe.aggregate.base import (
    Aggregator,
    CrossExpert,
    ExpertGroup,
    Group,
    MergeSpec,
    RoundInputs,
    SameIndex,
    Upload,
    sample_weights,
)
from fedmoe.aggregate.fedavg import FedAvg
from fedmoe.aggregate.fedmoe_da import FedMoEDA, GateMode, Interval, StaleProxies
from fedmoe.aggregate.local import Local
from fedmoe.aggregate.naive_moe import NaiveMoE
from fedmoe.aggregate.oracle_domain import OracleDomain
from fedmoe.aggregate.reduce import Reduce, ReduceKind

AGGREGATORS: dict[str, type[Aggregator]] = {
    cls.name: cls for cls in (FedMoEDA, FedAvg, NaiveMoE, Local, OracleDomain)
}


def make_method(name: str, params: dict[str, object] | None = None) -> Aggregator:
    """The method ``name`` with ``params`` (validated against its declared parameters)."""
    from fedmoe.errors import UsageError
    from fedmoe.params import from_mapping

    if name not in AGGREGATORS:
        raise UsageError(f"unknown method '{name}'", hint=f"use one of {', '.join(AGGREGATORS)}")
    instance: Aggregator = from_mapping(AGGREGATORS[name], dict(params or {}))
    return instance


__all__ = [
    "AGGREGATORS",
    "Aggregator",
    "CrossExpert",
    "ExpertGroup",
    "FedAvg",
    "FedMoEDA",
    "GateMode",
    "Group",
    "Interval",
    "Local",
    "MergeSpec",
    "NaiveMoE",
    "OracleDomain",
    "Reduce",
    "ReduceKind",
    "RoundInputs",
    "SameIndex",
    "StaleProxies",
    "Upload",
    "make_method",
    "sample_weights",
]
