"""Which client-experts serve similar domains (FedMoE-DA, arXiv 2411.02115, Eq. 8): gate-row
proxies, their exact blocked top-k cosine similarity, expert–domain/label shares from routing."""

from fedmoe.affinity.compute import Affinity, LayerAffinity, compute_affinity
from fedmoe.affinity.domain import dominant, share_table
from fedmoe.affinity.proxies import ExpertIndex, Upload, stack_proxies
from fedmoe.affinity.topk import Neighbours, topk_cosine, topk_cosine_reference

__all__ = [
    "Affinity",
    "ExpertIndex",
    "LayerAffinity",
    "Neighbours",
    "Upload",
    "compute_affinity",
    "dominant",
    "share_table",
    "stack_proxies",
    "topk_cosine",
    "topk_cosine_reference",
]
