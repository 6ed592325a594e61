"""Local training hyper-parameters, declared (and importable without torch: ``--help`` and recipes
read their defaults and help text from here)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from fedmoe.params import check_params, param


class Optimizer(str, enum.Enum):
    """The local optimisers."""

    ADAM = "adam"
    ADAMW = "adamw"
    SGD = "sgd"


class Precision(str, enum.Enum):
    """The arithmetic of local training's matrix products."""

    FP32 = "fp32"
    BF16 = "bf16"


@dataclass(frozen=True)
class TrainConfig:
    """Local training hyper-parameters (the one source of their defaults)."""

    epochs: int = param(2, "passes over the client's train split per round", ge=0)
    batch_size: int = param(32, "samples per step", ge=1)
    lr: float = param(3e-3, "learning rate", gt=0.0)
    optimizer: Optimizer = param(Optimizer.ADAM, "adam, adamw or sgd (momentum 0.9)")
    weight_decay: float = param(0.0, "L2 (adam, sgd) or decoupled (adamw) weight decay", ge=0.0)
    balance_coef: float = param(0.01, "weight of the load-balancing loss (Switch: 0.01)", ge=0.0)
    prox_mu: float = param(
        0.0,
        "FedProx proximal weight mu: adds mu/2 * ||w - w_start||^2 to the loss (0: off)",
        ge=0.0,
    )
    precision: Precision = param(
        Precision.FP32,
        "fp32, or bf16: bfloat16 autocast for the matrix products, fp32 master weights and "
        "optimiser (fast only on CPUs with AVX512-BF16 or AMX)",
    )

    def __post_init__(self) -> None:
        check_params(self)

    def to_dict(self) -> dict[str, object]:
        """Plain JSON values."""
        return {
            **self.__dict__,
            "optimizer": self.optimizer.value,
            "precision": self.precision.value,
        }
