"""The MoE classifier: config, embedding φ, router G, stacked experts θ, load-balancing loss."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedmoe._lazy import lazy_exports

if TYPE_CHECKING:
    from fedmoe.model.balance import load_balance_loss
    from fedmoe.model.classifier import (
        MoEClassifier,
        MoEOutput,
        Route,
        build_model,
        holding,
        init_model,
        state_of,
    )
    from fedmoe.model.config import MoEConfig
    from fedmoe.model.experts import Experts
    from fedmoe.model.router import Router
    from fedmoe.model.schema import FEDMOE_LAYOUT, Layout, ModelSchema, PartSizes, Role, TensorRule
    from fedmoe.model.shapes import expected_shapes, schema_for

_EXPORTS = {
    "load_balance_loss": "balance",
    "MoEClassifier": "classifier",
    "MoEOutput": "classifier",
    "Route": "classifier",
    "build_model": "classifier",
    "holding": "classifier",
    "expected_shapes": "shapes",
    "init_model": "classifier",
    "schema_for": "shapes",
    "state_of": "classifier",
    "MoEConfig": "config",
    "Experts": "experts",
    "Router": "router",
    "FEDMOE_LAYOUT": "schema",
    "Layout": "schema",
    "ModelSchema": "schema",
    "PartSizes": "schema",
    "Role": "schema",
    "TensorRule": "schema",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)

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
    "holding",
    "init_model",
    "load_balance_loss",
    "schema_for",
    "state_of",
]
