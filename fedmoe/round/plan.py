"""Any method's round: its merge spec and the round's traffic, from the round's inputs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fedmoe.aggregate.base import Aggregator, MergeSpec, RoundInputs
from fedmoe.errors import InputError
from fedmoe.plan import Ledger, server_ledger
from fedmoe.round.sync import SyncPlan


@dataclass(frozen=True)
class RoundPlan:
    """What the server decides in one round."""

    spec: MergeSpec  # how every client's next model is built
    ledger: Ledger  # the round's traffic
    sync: SyncPlan | None  # FedMoE-DA's sync plan (None for the other methods)


def plan_round(inputs: RoundInputs, method: Aggregator, sync: SyncPlan | None = None) -> RoundPlan:
    """The merge of ``method`` for ``inputs``; FedMoE-DA takes its matrices from ``sync``.

    Raises
    ------
    InputError
        When a method that needs the sync plan gets none, or the plan is for other clients.
    """
    if method.uses_matrix:
        if sync is None:
            raise InputError(
                f"{method.name} needs the round's sync plan", hint="pass --plan from plan-sync"
            )
        if sync.participants != inputs.participants:
            raise InputError(
                f"the sync plan is for clients {list(sync.participants)}, the round's uploads "
                f"are from clients {list(inputs.participants)}",
                hint="plan and aggregate the same round's checkpoints",
            )
        if method != sync.method:
            raise InputError(
                f"the sync plan was made with other {method.name} parameters than the merge's",
                hint="merge with the plan's own parameters (re-plan to change them)",
            )
        inputs = dataclasses.replace(inputs, matrices=sync.matrices, matrix_round=sync.matrix_round)
        ledger = sync.ledger
    else:
        ledger = server_ledger(inputs.schema.sizes(), len(inputs.participants), method.moves)
    return RoundPlan(method.spec(inputs), ledger, sync)
