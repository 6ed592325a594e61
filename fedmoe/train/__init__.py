"""Local training of one client, its routing statistics, and evaluation."""

from fedmoe.train.client import ClientUpdate, client_seed, tensors, train_client
from fedmoe.train.evaluate import accuracy, evaluate_models, predict
from fedmoe.train.local import TrainConfig, TrainResult, train_local
from fedmoe.train.routing import layer_stats, routing_stats

__all__ = [
    "ClientUpdate",
    "TrainConfig",
    "TrainResult",
    "accuracy",
    "client_seed",
    "evaluate_models",
    "layer_stats",
    "predict",
    "routing_stats",
    "tensors",
    "train_client",
    "train_local",
]
