"""Local training only: no communication, every client keeps its model (the lower reference)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fedmoe.aggregate.base import Aggregator, MergeSpec, RoundInputs
from fedmoe.model.schema import Role


@dataclass(frozen=True, kw_only=True)
class Local(Aggregator):
    """Nothing moves: no group, so every client keeps every part."""

    name: ClassVar[str] = "local"
    summary: ClassVar[str] = "no communication: every client keeps its own model"
    moves: ClassVar[frozenset[Role]] = frozenset()

    def spec(self, inputs: RoundInputs) -> MergeSpec:
        return MergeSpec(
            self.name, inputs.clients, (), (), tuple(None for _ in inputs.schema.num_experts)
        )
