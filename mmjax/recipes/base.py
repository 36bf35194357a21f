"""What a recipe hands the trainer. The trainer owns the loop, the optimizer, sharding, checkpoints,
logging and the file system; a recipe supplies the pieces below and nothing else.

- `init(rng)`: the model's variables, boxed with logical axis names: {'params': ..., and any
  non-gradient collections (e.g. 'stats': EMA codebook statistics, batch statistics)}. Those
  collections live in the train state beside the parameters: sharded by their axis names,
  checkpointed, never seen by the optimizer, weight decay or the parameter EMA.
- `preprocess(component)`: a picklable record -> dict-of-arrays function per data component.
- `loss(params, batch, ctx)`: `(loss, metrics)` or `(loss, metrics, stats)`. `loss` and metrics may
  be `Mean` / `Sum` (mmjax.objectives.reduce) so gradient accumulation and sharding combine them
  exactly; `stats` are additive arrays (sums and counts) that `update_state` turns into the new
  non-gradient state after the step (inside the NaN guard: a skipped step changes nothing).
- `constrain(params, ctx)`: applied after every update (a parameter with a valid range), with
  `ctx.state` the state `update_state` just made; it may write the parameters `fixed_params()`
  names (e.g. a codebook that follows EMA statistics), which the optimizer never touches.
- `fixed_params()`: those, and what the recipe's stage holds fixed (a frozen tokenizer).
- `evaluators()`: {name: Evaluator}; an evaluation returns floats and artefacts (images, texts).
- `sample(params, prompts, num_samples, ctx)`: what `mmjax sample` calls (optional).
- `exports()`: the parts `mmjax export --part NAME` writes as weights folders.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import numpy as np

from mmjax.config import ConfigError


@flax.struct.dataclass
class Context:
    """What a loss, a hook, an evaluator step or a sampler knows besides parameters and the batch."""

    rng: jax.Array
    step: jax.Array  # int32: the step being taken (0 = the first), or the step evaluated
    state: Any  # the non-gradient model variables {collection: tree}; {} when the model has none


@dataclasses.dataclass(frozen=True)
class Evaluator:
    """An evaluation: data, a jitted per-batch step, and a host-side summary.

    `data` is a component-like config (source, split, view, num_examples, batch_size);
    `step(params, batch, ctx)` returns arrays with a leading batch axis (or scalars to sum);
    `finalize(outputs)` turns the concatenated per-example outputs into {name: float, or an
    `mmjax.eval.artefacts.Images` / `Texts`, which the trainer writes under WORKDIR/eval/step_N/}.
    """

    data: Any
    preprocess: Callable[[dict], dict]
    step: Callable[[Any, dict, Context], dict]
    finalize: Callable[[dict[str, np.ndarray]], dict]


@dataclasses.dataclass(frozen=True)
class Export:
    """A part of the model as a weights folder: the subtree `into` ('' = all), what it is (`meta`:
    `kind`, `model` kwargs, ...) and the tokenizer to save with it (or None)."""

    into: str
    meta: dict
    tokenizer: Any = None


class Recipe:
    """Base class: subclasses set what they need in __init__ and implement the methods below."""

    def __init__(self, config):
        self.config = config

    def init(self, rng: jax.Array) -> dict:
        """The variables {'params': ..., other collections...}, with logical-axis metadata (boxed)."""
        raise NotImplementedError

    def preprocess(self, component: str) -> Callable[[dict], dict]:
        raise NotImplementedError

    def loss(self, params, batch: dict, ctx: Context):
        raise NotImplementedError

    def update_state(self, state, stats: dict, ctx: Context):
        """The new non-gradient state from this step's summed `stats` (the whole global batch)."""
        raise NotImplementedError(
            f"recipe {self.config.recipe!r} returns stats from its loss but has no update_state"
        )

    def constrain(self, params, ctx: Context):
        return params

    def fixed_params(self) -> tuple[str, ...]:
        """Patterns (`optim.freeze` syntax) of parameters the optimizer never touches, whatever
        `optim.freeze` says: those only `constrain` writes, and those a recipe's stage holds fixed
        (no gradient step, no optimizer state)."""
        return ()

    def packing(self) -> dict[str, int] | None:
        """{feature: packed length} to pack examples into fixed-length rows; None: no packing."""
        return None

    def evaluators(self) -> dict[str, Evaluator]:
        return {}

    def sample(self, params, prompts: list[dict], num_samples: int, ctx: Context) -> list[list[dict]]:
        """For each prompt ({'text': str, optional 'image': uint8 [H, W, 3], other fields passed
        through}), `num_samples` outputs, each {'image': uint8 [H, W, 3]} or {'text': str}."""
        raise ConfigError(f"recipe {self.config.recipe!r} has no sampler (`mmjax sample` needs one)")

    def exports(self) -> dict[str, Export]:
        return {"": Export("", {"kind": self.config.recipe, "model": self.config.model.to_dict()})}
