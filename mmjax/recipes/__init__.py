"""Recipes: each wires models, objectives and evaluators for the one trainer."""

import importlib

from mmjax.config import ConfigError
from mmjax.recipes.base import Evaluator, Recipe


def get(config) -> Recipe:
    try:
        module = importlib.import_module(f"mmjax.recipes.{config.recipe}")
    except ModuleNotFoundError as e:
        raise ConfigError(f"recipe {config.recipe!r} not found (mmjax/recipes/{config.recipe}.py)") from e
    return module.Recipe(config)


__all__ = ["Evaluator", "Recipe", "get"]
