"""The sparse aggregation matrix of FedMoE-DA (Eq. 9–10), the peer-to-peer transfer list it implies
(Eq. 11), and the traffic ledger of a round."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedmoe._lazy import lazy_exports

if TYPE_CHECKING:
    from fedmoe.plan.hubness import csls, hub_scores
    from fedmoe.plan.ledger import Ledger, server_ledger, traffic_ledger
    from fedmoe.plan.matrix import (
        AggregationMatrix,
        aggregation_matrix,
        client_prior,
        drop_small,
        identity_matrix,
        restrict,
    )
    from fedmoe.plan.transfers import Transfer, Transfers, transfer_list, transfer_table

_EXPORTS = {
    "csls": "hubness",
    "hub_scores": "hubness",
    "Ledger": "ledger",
    "server_ledger": "ledger",
    "traffic_ledger": "ledger",
    "AggregationMatrix": "matrix",
    "aggregation_matrix": "matrix",
    "client_prior": "matrix",
    "drop_small": "matrix",
    "identity_matrix": "matrix",
    "restrict": "matrix",
    "Transfer": "transfers",
    "transfer_list": "transfers",
    "Transfers": "transfers",
    "transfer_table": "transfers",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "AggregationMatrix",
    "Ledger",
    "Transfer",
    "Transfers",
    "aggregation_matrix",
    "client_prior",
    "csls",
    "drop_small",
    "hub_scores",
    "identity_matrix",
    "restrict",
    "server_ledger",
    "traffic_ledger",
    "transfer_list",
    "transfer_table",
]
