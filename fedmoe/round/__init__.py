"""The round core: pure functions from a round's inputs to its plan, shared by the ``plan-sync`` /
``aggregate`` commands, ``fedmoe run`` and any engine adapter.

- :mod:`~fedmoe.round.sync`: FedMoE-DA's matrices (Eq. 9–10, per MoE layer, refreshed every I
  rounds over every client whose proxies the server holds) and the round's sync plan (the rows
  applied, the peer-to-peer transfers, the traffic ledger).
- :mod:`~fedmoe.round.plan`: any method's merge spec and ledger for the round.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedmoe._lazy import lazy_exports

if TYPE_CHECKING:
    from fedmoe.round.plan import RoundPlan, plan_round
    from fedmoe.round.sync import SyncPlan, build_matrices, held_uploads, plan_sync

_EXPORTS = {
    "RoundPlan": "plan",
    "plan_round": "plan",
    "SyncPlan": "sync",
    "build_matrices": "sync",
    "held_uploads": "sync",
    "plan_sync": "sync",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)

__all__ = ["RoundPlan", "SyncPlan", "build_matrices", "held_uploads", "plan_round", "plan_sync"]
