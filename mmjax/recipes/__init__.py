"""Recipes: each wires models, objectives and evaluators for the one trainer."""

import importlib

from mmjax.config import ConfigError
from mmjax.recipes.base import Evaluator, Recipe


def get(config) -> Recipe:
    """The recipe `config.recipe` names: `mm1` is mmjax/recipes/mm1.py; a dotted name is a module of
    your own (`my_project.my_recipe`) that defines `Recipe`."""
    name = config.recipe if "." in config.recipe else f"mmjax.recipes.{config.recipe}"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is not None and not name.startswith(e.name):
            raise  # the recipe exists but imports something missing
        raise ConfigError(f"recipe {config.recipe!r} not found (no module {name})") from e
    if not isinstance(getattr(module, "Recipe", None), type):
        raise ConfigError(f"recipe module {name} defines no Recipe class")
    return module.Recipe(config)


__all__ = ["Evaluator", "Recipe", "get"]
