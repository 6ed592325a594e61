"""The MoE classifier: config, embedding φ, router G, stacked experts θ, load-balancing loss."""

from fedmoe.model.balance import load_balance_loss
from fedmoe.model.classifier import MoEClassifier, MoEOutput, build_model, init_model, state_of
from fedmoe.model.config import MoEConfig
from fedmoe.model.experts import Experts
from fedmoe.model.router import Router

__all__ = [
    "Experts",
    "MoEClassifier",
    "MoEConfig",
    "MoEOutput",
    "Router",
    "build_model",
    "init_model",
    "load_balance_loss",
    "state_of",
]
