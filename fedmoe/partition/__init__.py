"""Partition schemes: how a dataset is split into federated clients.

:data:`PARTITIONERS` maps each scheme name to its class; ``--scheme`` choices, option validation
and help text come from it. :func:`make_partition` runs the shared pipeline around a scheme.
"""

from fedmoe.errors import UsageError
from fedmoe.partition.base import Partitioner, PoolInfo, nearest
from fedmoe.partition.dirichlet import DirichletPartitioner
from fedmoe.partition.domain import DomainPartitioner
from fedmoe.partition.domain_label import DomainLabelPartitioner
from fedmoe.partition.iid import IidPartitioner
from fedmoe.partition.pipeline import ClientSplit, Partition, make_partition
from fedmoe.partition.quantity import QuantityPartitioner
from fedmoe.partition.shards import ShardsPartitioner

PARTITIONERS: dict[str, type[Partitioner]] = {
    cls.name: cls
    for cls in (
        IidPartitioner,
        DirichletPartitioner,
        DomainPartitioner,
        DomainLabelPartitioner,
        ShardsPartitioner,
        QuantityPartitioner,
    )
}


def get_partitioner(scheme: str, options: dict[str, object]) -> Partitioner:
    """Build scheme ``scheme`` from ``options`` (unknown schemes and options are usage errors)."""
    if scheme not in PARTITIONERS:
        raise UsageError(
            f"unknown scheme '{scheme}'{nearest(scheme, list(PARTITIONERS))}",
            hint=f"choose one of {', '.join(PARTITIONERS)}",
        )
    return PARTITIONERS[scheme].from_options(options)


__all__ = [
    "PARTITIONERS",
    "ClientSplit",
    "Partition",
    "Partitioner",
    "PoolInfo",
    "get_partitioner",
    "make_partition",
]
