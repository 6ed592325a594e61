"""Simulated malicious clients: what an attack is told (:class:`AttackContext`), the attack
kinds, the recipe section that configures them (:class:`AttackConfig`) and which clients attack.

An attack is simulation only: in ``fedmoe run`` a malicious client trains like any other, then
replaces what it sends — its shared parts and gate to the server, its experts to the peers whose
plans name them — by a poisoned version. Attackers are omniscient and collude, as in the
literature's worst cases: they see every benign participant's trained model of the round. Their
own accuracy is not counted; the run reports the benign clients' accuracy.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fedmoe.model.schema import ModelSchema
from fedmoe.params import check_params, param

if TYPE_CHECKING:
    import torch

State = Mapping[str, "torch.Tensor"]


class AttackParts(str, enum.Enum):
    """Which parts of its model a malicious client poisons (the rest it sends honestly)."""

    ALL = "all"
    SHARED = "shared"  # what the server averages: the shared parts (and the gate)
    EXPERTS = "experts"  # what travels peer to peer (mimicry still copies gate rows)


class AttackKind(str, enum.Enum):
    """The simulated attacks."""

    SIGN_FLIP = "sign-flip"
    SCALING = "scaling"
    NOISE = "noise"
    ALIE = "alie"
    MIMICRY = "mimicry"


@dataclass(frozen=True)
class AttackContext:
    """What one malicious client knows when it poisons one round's upload."""

    schema: ModelSchema  # the roles of the model's tensors
    start: State  # its model at the start of the round
    trained: State  # its model after honest local training
    benign: tuple[State, ...]  # the round's benign participants' trained models (collusion)
    scale: float | None  # the kind's strength (None: the kind's default)
    rank: int  # its position among the round's attackers (0-based)
    attackers: int  # malicious participants this round
    participants: int  # all participants this round
    seed: int  # for random draws: derived from (run seed, round, client)

    def update(self, name: str) -> torch.Tensor:
        """Its honest update Δ = trained − start of tensor ``name``."""
        return self.trained[name] - self.start[name]


@dataclass(frozen=True)
class AttackConfig:
    """The recipe's ``attack:`` section."""

    kinds: tuple[AttackKind, ...] = ()  # each method also runs under each of these attacks
    fraction: float = param(0.2, "share of clients that are malicious", ge=0.0, le=1.0)
    scale: float | None = param(
        None,
        "strength: sign-flip λ (θ0 − λΔ, default 1), scaling λ (θ0 + λΔ, default 10),"
        " noise σ in units of each tensor's RMS (default 1), alie z (default Baruch et al.'s"
        " z_max)",
        gt=0.0,
    )
    poison: AttackKind = param(
        AttackKind.NOISE, "mimicry: how the mimicking client poisons its other tensors"
    )
    start_round: int = param(1, "first round in which the malicious clients attack", ge=1)
    parts: AttackParts = param(
        AttackParts.ALL, "what the malicious clients poison: all, shared (server side) or experts"
    )
    clean: bool = param(True, "also run every method without the attack")

    def __post_init__(self) -> None:
        from fedmoe.errors import ParamError

        check_params(self)
        if isinstance(self.kinds, (str, AttackKind)) or not isinstance(self.kinds, (list, tuple)):
            raise ParamError("kinds", self.kinds, "must be a list of attack kinds")
        kinds = []
        for k in self.kinds:
            try:
                kinds.append(AttackKind(k))
            except ValueError:
                valid = ", ".join(a.value for a in AttackKind)
                raise ParamError("kinds", k, f"must be one of {valid}") from None
        object.__setattr__(self, "kinds", tuple(dict.fromkeys(kinds)))
        if self.poison is AttackKind.MIMICRY:
            raise ParamError("poison", self.poison.value, "must be an attack other than mimicry")

    def to_dict(self) -> dict[str, object]:
        """Plain data, as in the recipe."""
        return {
            "kinds": [k.value for k in self.kinds],
            "fraction": self.fraction,
            "scale": self.scale,
            "poison": self.poison.value,
            "start_round": self.start_round,
            "clean": self.clean,
            "parts": self.parts.value,
        }


def malicious_clients(seed: int, num_clients: int, fraction: float) -> tuple[int, ...]:
    """The malicious clients of a run: round(fraction·N) of them, drawn from the run seed only
    (the same set for every method and attack kind)."""
    k = math.floor(fraction * num_clients + 0.5)
    if k <= 0:
        return ()
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xA77AC]))
    return tuple(sorted(int(c) for c in rng.choice(num_clients, size=k, replace=False)))


def generator(seed: int) -> torch.Generator:
    """A torch generator for one attacker's draws."""
    import torch

    g = torch.Generator()
    g.manual_seed(seed)
    return g
