"""Whole federations: recipes, the orchestrator that runs every method side by side, the report."""

from fedmoe.run.recipe import Recipe, load_recipe, recipe_from_dict

__all__ = ["Recipe", "load_recipe", "recipe_from_dict"]
