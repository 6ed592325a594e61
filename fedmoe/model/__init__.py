"""The MoE classifier: config, embedding φ, router G, stacked experts θ, load-balancing loss."""

from fedmoe.model.balance import load_balance_loss
from fedmoe.model.classifier import (
    MoEClassifier,
    MoEOutput,
    Route,
    build_model,
    expected_shapes,
    init_model,
    schema_for,
    state_of,
)
from fedmoe.model.config import MoEConfig
from fedmoe.model.experts import Experts
from fedmoe.model.router import Router
from fedmoe.model.schema import FEDMOE_LAYOUT, Layout, ModelSchema, PartSizes, Role, TensorRule

__all__ = [
    "FEDMOE_LAYOUT",
    "Experts",
    "Layout",
    "MoEClassifier",
    "MoEConfig",
    "MoEOutput",
    "ModelSchema",
    "PartSizes",
    "Role",
    "Route",
    "Router",
    "TensorRule",
    "build_model",
    "expected_shapes",
    "init_model",
    "load_balance_loss",
    "schema_for",
    "state_of",
]
