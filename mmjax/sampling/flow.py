"""Flow-matching sampling: a time schedule, an Euler integrator and classifier-free guidance.

Time convention (that of `mmjax.objectives.flow_matching`): t = 1 is noise, t = 0 is data,
`x_t = (1 - t) x + t z`, and the model's velocity is `dx_t/dt = z - x`. Sampling integrates from
t = 1 (pure noise z) down to t = 0.

The sampler is model-agnostic: it takes `velocity(x, t) -> v` with t [B]. Call it inside jit, with
the model's parameters and condition as arguments of the jitted function, e.g.

    @jax.jit
    def sample(params, z, sigmas, cond, uncond):
        v = lambda x, t, c: model.apply({'params': params}, x, t, c)
        return euler(cfg(v, cond, uncond, 4.0), z, sigmas)

`sigmas` is an array, so one compiled loop serves every schedule of that length.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from mmjax.objectives.flow_matching import shift_time

Velocity = Callable[[jax.Array, jax.Array], jax.Array]


def sigmas(steps: int, shift: float = 1.0, terminal: float = 0.0) -> jax.Array:
    """The `steps + 1` times [steps + 1] (float32) from 1 down to `terminal`: evenly spaced, then
    `shift_time`-ed (with terminal > 0 the even spacing ends where the shift lands on `terminal`).

    With terminal = 0 this is exactly the schedule diffusers' FlowMatchEulerDiscreteScheduler
    steps through when a pipeline passes the explicit sigmas `linspace(1, 1/N, N)` (FLUX,
    MetaQuery): `set_timesteps(sigmas=...)` applies the scheduler's `shift` to them and appends a
    terminal 0, and `linspace(1, 1/N, N)` is `linspace(1, 0, N + 1)` without its final 0. So
    `sigmas(N, shift)[:-1]`, passed to a scheduler with shift = 1, gives the same steps.
    (Diffusers' default, without explicit sigmas, ends its linspace at 1/num_train_timesteps.)
    """
    end = terminal / (shift - (shift - 1) * terminal)  # shift_time's inverse at terminal
    return shift_time(jnp.linspace(1.0, end, steps + 1, dtype=jnp.float32), shift)


def euler(velocity: Velocity, z: jax.Array, sigmas: jax.Array, *, trajectory: bool = False) -> jax.Array:
    """Integrates dx/dt = velocity(x, t) from x = z at t = sigmas[0] through every time of `sigmas`:
    `x_{i+1} = x_i + (s_{i+1} - s_i) * v(x_i, s_i)`, one `lax.scan` over the schedule.

    velocity(x, t) gets t as [B] (float32) and returns v shaped as x. The state keeps z's dtype (pass
    float32 z for a float32 integration). Returns the final x, or with `trajectory` every state
    [len(sigmas), *z.shape] (z first, the final x last).
    """
    sigmas = jnp.asarray(sigmas, jnp.float32)
    batch = z.shape[0]

    def step(x, s):
        t, t_next = s
        v = velocity(x, jnp.full((batch,), t))
        x = (x + (t_next - t) * v).astype(z.dtype)
        return x, x if trajectory else None

    x, xs = jax.lax.scan(step, z, (sigmas[:-1], sigmas[1:]))
    return jnp.concatenate([z[None], xs]) if trajectory else x


def cfg(
    velocity: Callable[[jax.Array, jax.Array, Any], jax.Array], cond: Any, uncond: Any, scale
) -> Velocity:
    """Classifier-free guidance: the velocity (x, t) -> v_u + scale * (v_c - v_u).

    `velocity(x, t, condition)` takes a condition pytree with a leading batch axis (e.g.
    {'h': [B, T, D], 'mask': [B, T]}; for editing both branches hold the reference image). Each
    call runs it once on 2B examples, the concatenation [cond; uncond]; nothing is assumed about
    `uncond` beyond matching `cond`'s structure. Computed as `v_c + (scale - 1) * (v_c - v_u)`, so
    scale = 1 gives the conditional velocity exactly.
    """
    both = jax.tree.map(lambda c, u: jnp.concatenate([c, u]), cond, uncond)

    def guided(x, t):
        v = velocity(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both)
        v_c, v_u = jnp.split(v, 2)
        return (v_c + (scale - 1) * (v_c - v_u)).astype(v.dtype)

    return guided
