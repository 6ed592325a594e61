"""Aggregation: methods that decide who merges with whom (one per file, registered in
:data:`AGGREGATORS`), the engine that applies a merge to checkpoints or tensors, and a plain linear
merge of any safetensors files."""

from fedmoe.aggregate.base import Aggregator, ClientInfo, MergeSpec, sample_weights
from fedmoe.aggregate.fedavg import FedAvg
from fedmoe.aggregate.fedmoe_da import FedMoEDA
from fedmoe.aggregate.local import Local
from fedmoe.aggregate.naive_moe import NaiveMoE
from fedmoe.aggregate.oracle_domain import OracleDomain

AGGREGATORS: dict[str, type[Aggregator]] = {
    cls.name: cls for cls in (FedMoEDA, FedAvg, NaiveMoE, Local, OracleDomain)
}

__all__ = [
    "AGGREGATORS",
    "Aggregator",
    "ClientInfo",
    "FedAvg",
    "FedMoEDA",
    "Local",
    "MergeSpec",
    "NaiveMoE",
    "OracleDomain",
    "sample_weights",
]
