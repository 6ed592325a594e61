"""Local training of one client, its routing statistics, and evaluation."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedmoe._lazy import lazy_exports

if TYPE_CHECKING:
    from fedmoe.train.client import ClientUpdate, client_seed, tensors, train_client
    from fedmoe.train.config import TrainConfig
    from fedmoe.train.evaluate import (
        ClientEval,
        accuracy,
        evaluate_client,
        evaluate_models,
        predict,
        summarise,
    )
    from fedmoe.train.local import TrainResult, train_local
    from fedmoe.train.routing import layer_stats, routing_stats

_EXPORTS = {
    "ClientUpdate": "client",
    "client_seed": "client",
    "tensors": "client",
    "train_client": "client",
    "ClientEval": "evaluate",
    "accuracy": "evaluate",
    "evaluate_client": "evaluate",
    "summarise": "evaluate",
    "evaluate_models": "evaluate",
    "predict": "evaluate",
    "TrainConfig": "config",
    "TrainResult": "local",
    "train_local": "local",
    "layer_stats": "routing",
    "routing_stats": "routing",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "ClientEval",
    "ClientUpdate",
    "TrainConfig",
    "TrainResult",
    "accuracy",
    "client_seed",
    "evaluate_client",
    "evaluate_models",
    "layer_stats",
    "predict",
    "routing_stats",
    "summarise",
    "tensors",
    "train_client",
    "train_local",
]
