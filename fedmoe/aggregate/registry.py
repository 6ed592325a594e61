"""The registry of aggregation methods: name → class, and :func:`make_method`."""

from __future__ import annotations

from fedmoe.aggregate.base import Aggregator
from fedmoe.aggregate.fedavg import FedAvg
from fedmoe.aggregate.fedmoe_da import FedMoEDA
from fedmoe.aggregate.fedper import FedPer
from fedmoe.aggregate.fedprox import FedProx
from fedmoe.aggregate.ifca import IFCA
from fedmoe.aggregate.local import Local
from fedmoe.aggregate.naive_moe import NaiveMoE
from fedmoe.aggregate.oracle_domain import OracleDomain

AGGREGATORS: dict[str, type[Aggregator]] = {
    cls.name: cls
    for cls in (FedMoEDA, FedAvg, NaiveMoE, Local, OracleDomain, FedProx, FedPer, IFCA)
}


def make_method(name: str, params: dict[str, object] | None = None) -> Aggregator:
    """The method ``name`` with ``params`` (validated against its declared parameters)."""
    from fedmoe.errors import UsageError
    from fedmoe.params import from_mapping

    if name not in AGGREGATORS:
        raise UsageError(f"unknown method '{name}'", hint=f"use one of {', '.join(AGGREGATORS)}")
    instance: Aggregator = from_mapping(AGGREGATORS[name], dict(params or {}))
    return instance
