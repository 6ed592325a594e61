"""Bytes of each part of a model: what the server, the peers and FedAvg would move."""

from __future__ import annotations

from dataclasses import dataclass

from fedmoe.model.config import MoEConfig


@dataclass(frozen=True)
class TensorSizes:
    """Byte counts of one model's parts (all tensors float32 in format fedmoe-moe/1)."""

    embed: int  # φ: every ``embed.*`` tensor
    gate: int  # G: ``gate.*``
    expert: int  # one expert θ_j: slice j of every ``experts.*`` tensor
    num_experts: int  # E

    @property
    def model(self) -> int:
        """The whole model: φ + G + E experts."""
        return self.embed + self.gate + self.num_experts * self.expert


def tensor_sizes(config: MoEConfig, bytes_per_value: int = 4) -> TensorSizes:
    """Sizes of a model of ``config`` (the same numbers a checkpoint's header gives)."""
    from fedmoe.io.checkpoint import expected_shapes

    embed = gate = experts = 0
    for name, shape in expected_shapes(config).items():
        count = 1
        for s in shape:
            count *= s
        if name.startswith("embed."):
            embed += count
        elif name.startswith("gate."):
            gate += count
        else:
            experts += count
    return TensorSizes(
        embed * bytes_per_value,
        gate * bytes_per_value,
        experts * bytes_per_value // config.num_experts,
        config.num_experts,
    )
