"""Whole federations: recipes, the orchestrator that runs every method side by side, the report.

The recipe names are loaded on first use (PEP 562), so ``fedmoe.run.report`` — what ``fedmoe
report`` needs — is importable without the methods and torch behind the recipes.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Recipe", "load_recipe", "recipe_from_dict"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from fedmoe.run import recipe

        return getattr(recipe, name)
    raise AttributeError(f"module 'fedmoe.run' has no attribute {name!r}")
