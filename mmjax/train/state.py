"""The train state: parameters, non-gradient model state, optimizer state over the trainable
parameters, EMA, and counters. Frozen models (config.frozen) are not part of it."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from mmjax import tree


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # steps taken (also the data position and the RNG index)
    params: Any  # the 'params' collection, nested (frozen models excluded)
    model_state: Any  # the model's other collections {collection: nested tree}; {} when none
    opt_state: Any  # over the trainable parameters only (flat name -> array)
    ema: Any  # EMA of the trainable parameters (flat), {} when off
    bad_streak: jax.Array  # consecutive non-finite steps (skipped)
    bad_total: jax.Array  # all skipped steps; step - bad_total updates were applied

    def eval_params(self):
        """Parameters for evaluation: the EMA where there is one."""
        if not self.ema:
            return self.params
        return tree.unflat({**tree.flat(self.params), **self.ema})


def create(params, model_state, tx, trainable, ema: bool) -> TrainState:
    tr = {n: tree.flat(params)[n] for n in trainable}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        model_state=model_state,
        opt_state=tx.init(tr),
        ema=dict(tr) if ema else {},
        bad_streak=jnp.zeros((), jnp.int32),
        bad_total=jnp.zeros((), jnp.int32),
    )
