"""The train state: parameters, optimizer state over the trainable ones, EMA, and counters."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from mmjax import parallel


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # optimizer steps taken (also the data position and the RNG index)
    params: Any  # the full 'params' collection, nested
    opt_state: Any  # over the trainable parameters only (flat name -> array)
    ema: Any  # EMA of the trainable parameters (flat), {} when off
    bad_streak: jax.Array  # consecutive non-finite steps (skipped)
    bad_total: jax.Array  # all skipped steps

    def eval_params(self):
        """Parameters for evaluation: the EMA where there is one."""
        if not self.ema:
            return self.params
        return parallel.unflat({**parallel.flat(self.params), **self.ema})


def create(params, tx, trainable, ema: bool) -> TrainState:
    tr = {n: parallel.flat(params)[n] for n in trainable}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(tr),
        ema=dict(tr) if ema else {},
        bad_streak=jnp.zeros((), jnp.int32),
        bad_total=jnp.zeros((), jnp.int32),
    )
