"""Which client-experts serve similar domains (FedMoE-DA, arXiv 2411.02115, Eq. 8): gate-row
proxies, their exact blocked top-k cosine similarity, expert–domain/label shares from routing."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedmoe._lazy import lazy_exports

if TYPE_CHECKING:
    from fedmoe.affinity.compute import Affinity, LayerAffinity, compute_affinity
    from fedmoe.affinity.domain import dominant, share_table
    from fedmoe.affinity.proxies import ExpertIndex, Upload, stack_proxies
    from fedmoe.affinity.topk import Neighbours, topk_cosine, topk_cosine_reference

_EXPORTS = {
    "Affinity": "compute",
    "LayerAffinity": "compute",
    "compute_affinity": "compute",
    "dominant": "domain",
    "share_table": "domain",
    "ExpertIndex": "proxies",
    "Upload": "proxies",
    "stack_proxies": "proxies",
    "Neighbours": "topk",
    "topk_cosine": "topk",
    "topk_cosine_reference": "topk",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)

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
