"""The sparse aggregation matrix of FedMoE-DA (Eq. 9–10), the peer-to-peer transfer list it implies
(Eq. 11), and the traffic ledger of a round."""

from fedmoe.plan.ledger import Ledger, traffic_ledger
from fedmoe.plan.matrix import AggregationMatrix, aggregation_matrix, identity_matrix
from fedmoe.plan.sizes import TensorSizes, tensor_sizes
from fedmoe.plan.transfers import Transfer, transfer_list

__all__ = [
    "AggregationMatrix",
    "Ledger",
    "TensorSizes",
    "Transfer",
    "aggregation_matrix",
    "identity_matrix",
    "tensor_sizes",
    "traffic_ledger",
    "transfer_list",
]
