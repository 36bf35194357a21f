"""Flow matching (rectified flow), the objective of SD3, FLUX and MetaQuery's diffusion head.

Time convention (shared with `mmjax.sampling.flow`): t = 1 is noise, t = 0 is data. A data point x
and noise z give `x_t = (1 - t) x + t z`, and the model predicts the velocity `dx_t/dt = z - x`
(diffusers' convention: its FlowMatchEulerDiscreteScheduler's sigma is this t). Sampling integrates
from t = 1 down to t = 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmjax.objectives.reduce import Mean

TIME_KINDS = ('uniform', 'logit_normal')


def shift_time(t: jax.Array, shift: float) -> jax.Array:
    """SD3/FLUX's resolution shift `shift * t / (1 + (shift - 1) * t)`: shift > 1 moves t toward 1
    (noise); shift = 1 is the identity; 0 and 1 stay fixed."""
    return shift * t / (1 + (shift - 1) * t)


def sample_time(
    rng: jax.Array,
    shape,
    kind: str = 'uniform',
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
) -> jax.Array:
    """Training times in [0, 1] (float32): U(0, 1) or sigmoid(N(mean, std)) (SD3's logit-normal),
    then `shift_time`."""
    if kind == 'uniform':
        t = jax.random.uniform(rng, shape)
    elif kind == 'logit_normal':
        t = jax.nn.sigmoid(mean + std * jax.random.normal(rng, shape))
    else:
        raise ValueError(f'unknown time distribution {kind!r}: expected one of {TIME_KINDS}')
    return shift_time(t, shift)


def _over_trailing(t: jax.Array, x: jax.Array) -> jax.Array:
    t = jnp.asarray(t)
    return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def noisy(x: jax.Array, z: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = (1 - t) x + t z, with t [B] (or any prefix of x's shape) broadcast over the trailing axes."""
    t = _over_trailing(t, x)
    return (1 - t) * x + t * z


def target(x: jax.Array, z: jax.Array) -> jax.Array:
    """The velocity target z - x."""
    return z - x


def mse(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Per-example mean squared error [B] (float32): the mean over all non-batch axes."""
    err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
    return err.reshape(err.shape[0], -1).mean(axis=1)


def loss(pred: jax.Array, target: jax.Array, weight: jax.Array | None = None) -> Mean:
    """The flow-matching loss: a Mean over examples (weighted by `weight` [B], if given) of the
    per-example MSE, so micro-batches combine exactly."""
    return Mean.of(mse(pred, target), weight)
