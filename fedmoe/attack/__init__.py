"""Simulated malicious clients for robustness studies (``attack:`` in a recipe): one attack per
file behind :class:`~fedmoe.attack.base.AttackContext`, and :func:`poison_upload` to apply one.

The package's names are imported on first use (:mod:`fedmoe._lazy`), so that a recipe's
``attack:`` section is read without importing torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedmoe._lazy import lazy_exports

if TYPE_CHECKING:
    from fedmoe.attack.base import (
        AttackConfig,
        AttackContext,
        AttackKind,
        AttackParts,
        malicious_clients,
    )
    from fedmoe.attack.poison import poison_upload

_EXPORTS = {
    "AttackConfig": "base",
    "AttackContext": "base",
    "AttackKind": "base",
    "AttackParts": "base",
    "malicious_clients": "base",
    "poison_upload": "poison",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "AttackConfig",
    "AttackContext",
    "AttackKind",
    "AttackParts",
    "malicious_clients",
    "poison_upload",
]
