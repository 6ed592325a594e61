"""The round core: pure functions from a round's inputs to its plan, shared by the ``plan-sync`` /
``aggregate`` commands, ``fedmoe run`` and any engine adapter.

- :mod:`~fedmoe.round.sync`: FedMoE-DA's matrices (Eq. 9–10, per MoE layer, refreshed every I
  rounds over every client whose proxies the server holds) and the round's sync plan (the rows
  applied, the peer-to-peer transfers, the traffic ledger).
- :mod:`~fedmoe.round.plan`: any method's merge spec and ledger for the round.
"""

from fedmoe.round.plan import RoundPlan, plan_round
from fedmoe.round.sync import SyncPlan, build_matrices, held_uploads, plan_sync

__all__ = ["RoundPlan", "SyncPlan", "build_matrices", "held_uploads", "plan_round", "plan_sync"]
