"""The sparse aggregation matrix of FedMoE-DA (Eq. 9–10), the peer-to-peer transfer list it implies
(Eq. 11), and the traffic ledger of a round."""

from fedmoe.plan.ledger import Ledger, server_ledger, traffic_ledger
from fedmoe.plan.matrix import AggregationMatrix, aggregation_matrix, identity_matrix, restrict
from fedmoe.plan.transfers import Transfer, transfer_list

__all__ = [
    "AggregationMatrix",
    "Ledger",
    "Transfer",
    "aggregation_matrix",
    "identity_matrix",
    "restrict",
    "server_ledger",
    "traffic_ledger",
    "transfer_list",
]
