"""What a recipe hands the trainer: its model's init, per-component preprocessing, a loss
returning (loss, metrics), and evaluators. The trainer owns everything else."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Evaluator:
    """An evaluation: data, a jitted per-batch step, and a host-side summary.

    `data` is a component-like config (source, split, view, num_examples, batch_size);
    `step(params, batch)` returns arrays with a leading batch axis (or scalars to sum);
    `finalize(outputs)` turns the concatenated per-example outputs into a dict of floats.
    """

    data: Any
    preprocess: Callable[[dict], dict]
    step: Callable[[Any, dict], dict]
    finalize: Callable[[dict[str, np.ndarray]], dict[str, float]]


class Recipe:
    """Base class: subclasses set `self.config` and implement the four methods."""

    def __init__(self, config):
        self.config = config

    def init(self, rng: jax.Array):
        """The 'params' collection, with logical-axis metadata (boxed)."""
        raise NotImplementedError

    def preprocess(self, component: str) -> Callable[[dict], dict]:
        """A picklable record -> dict-of-arrays function for one data component."""
        raise NotImplementedError

    def loss(self, params, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
        raise NotImplementedError

    def packing(self) -> dict[str, int] | None:
        """{feature: packed length} to pack examples into fixed-length rows; None: no packing."""
        return None

    def evaluators(self) -> dict[str, Evaluator]:
        return {}
