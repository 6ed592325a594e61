"""Aggregation: the contract (:mod:`~fedmoe.aggregate.base`), one method per file registered in
:data:`AGGREGATORS`, the reduce kinds, the engine that applies a merge to checkpoints or tensors,
and a plain linear merge of any safetensors files."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedmoe._lazy import lazy_exports

if TYPE_CHECKING:
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
    from fedmoe.aggregate.fedmoe_da import FedMoEDA, GateMode, Interval, StaleProxies, Wire
    from fedmoe.aggregate.fedper import FedPer
    from fedmoe.aggregate.fedprox import FedProx
    from fedmoe.aggregate.ifca import IFCA
    from fedmoe.aggregate.local import Local
    from fedmoe.aggregate.naive_moe import NaiveMoE
    from fedmoe.aggregate.oracle_domain import OracleDomain
    from fedmoe.aggregate.reduce import Reduce, ReduceKind
    from fedmoe.aggregate.registry import AGGREGATORS, make_method

_EXPORTS = {
    "Aggregator": "base",
    "CrossExpert": "base",
    "ExpertGroup": "base",
    "Group": "base",
    "MergeSpec": "base",
    "RoundInputs": "base",
    "SameIndex": "base",
    "Upload": "base",
    "sample_weights": "base",
    "FedAvg": "fedavg",
    "FedPer": "fedper",
    "FedProx": "fedprox",
    "FedMoEDA": "fedmoe_da",
    "GateMode": "fedmoe_da",
    "Interval": "fedmoe_da",
    "StaleProxies": "fedmoe_da",
    "Wire": "fedmoe_da",
    "IFCA": "ifca",
    "Local": "local",
    "NaiveMoE": "naive_moe",
    "OracleDomain": "oracle_domain",
    "Reduce": "reduce",
    "ReduceKind": "reduce",
    "AGGREGATORS": "registry",
    "make_method": "registry",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "AGGREGATORS",
    "IFCA",
    "Aggregator",
    "CrossExpert",
    "ExpertGroup",
    "FedAvg",
    "FedMoEDA",
    "FedPer",
    "FedProx",
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
    "Wire",
    "make_method",
    "sample_weights",
]
