"""Flow matching: the objective's formulas and exact accumulation, training times, the Euler sampler
(exact on a point mass, step-by-step equal to diffusers' FlowMatchEulerDiscreteScheduler) and CFG."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.objectives import flow_matching as fm
from mmjax.objectives.reduce import Mean
from mmjax.sampling.flow import cfg, euler, sigmas

B, SHAPE = 3, (4, 5)
X_STAR = jax.random.normal(jax.random.key(0), (B, *SHAPE))
Z = jax.random.normal(jax.random.key(1), (B, *SHAPE))


def point_mass(x, t):
    """The exact velocity when the data is the single point X_STAR: (x_t - x*) / t."""
    return (x - X_STAR) / t[:, None, None]


def affine(x, t):
    return 0.3 * x - 0.7 * t[:, None, None]


@functools.partial(jax.jit, static_argnames=('velocity', 'trajectory'))
def sample(velocity, z, s, trajectory=False):
    return euler(velocity, z, s, trajectory=trajectory)


@pytest.mark.parametrize('steps,shift', [(1, 1.0), (4, 1.0), (7, 3.0), (28, 0.5)])
def test_point_mass_lands_on_data(steps, shift):
    s = sigmas(steps, shift)
    assert s.shape == (steps + 1,) and s[0] == 1 and s[-1] == 0
    assert bool(jnp.all(jnp.diff(s) < 0))
    np.testing.assert_allclose(sample(point_mass, Z, s), X_STAR, atol=1e-5)
    # Along the way the state is the exact interpolant x_t = (1 - t) x* + t z.
    traj = sample(point_mass, Z, s, trajectory=True)
    assert traj.shape == (steps + 1, B, *SHAPE)
    np.testing.assert_allclose(traj, jax.vmap(lambda t: fm.noisy(X_STAR, Z, jnp.full(B, t)))(s), atol=1e-5)


def test_point_mass_any_schedule():
    s = jnp.array([1.0, 0.93, 0.5, 0.49, 0.1, 0.0])
    np.testing.assert_allclose(sample(point_mass, Z, s), X_STAR, atol=1e-5)
    assert not np.allclose(sample(affine, Z, s), X_STAR, atol=1e-2)  # the check can fail


def test_sigmas_shift_and_terminal():
    np.testing.assert_allclose(sigmas(4), [1.0, 0.75, 0.5, 0.25, 0.0])
    np.testing.assert_allclose(sigmas(4, 3.0), fm.shift_time(jnp.linspace(1, 0, 5), 3.0))
    assert bool(jnp.all(sigmas(4, 3.0)[1:-1] > sigmas(4)[1:-1]))
    s = sigmas(5, 3.0, terminal=0.2)
    assert s[0] == 1 and abs(float(s[-1]) - 0.2) < 1e-6 and bool(jnp.all(jnp.diff(s) < 0))


@pytest.mark.parametrize('velocity', [affine, point_mass])
@pytest.mark.parametrize('shift', [1.0, 3.0])
def test_matches_diffusers(velocity, shift):
    import diffusers
    import torch

    steps = 6
    ours = np.asarray(sample(velocity, Z, sigmas(steps, shift), trajectory=True))
    # FLUX/MetaQuery-style explicit sigmas linspace(1, 1/N, N); the scheduler shifts and appends 0.
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=False)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps))
    np.testing.assert_allclose(scheduler.sigmas.numpy(), sigmas(steps, shift), atol=1e-6)
    x = torch.from_numpy(np.array(Z))
    for i, timestep in enumerate(scheduler.timesteps):
        t = jnp.full(B, scheduler.sigmas[i].item(), jnp.float32)
        v = torch.from_numpy(np.array(velocity(jnp.asarray(x.numpy()), t)))
        x = scheduler.step(v, timestep, x).prev_sample
        np.testing.assert_allclose(x.numpy(), ours[i + 1], atol=1e-5, rtol=0)
    assert i == steps - 1


def conditional(x, t, c):
    """A velocity that depends on every leaf of a pytree condition."""
    return 0.5 * x - t[:, None, None] * c['h'].mean(axis=1, keepdims=True) * c['mask'][:, :, None] + c['ref']


COND = {
    'h': jax.random.normal(jax.random.key(2), (B, 4, 5)),
    'mask': jnp.array([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 1, 0]], jnp.float32),
    'ref': jax.random.normal(jax.random.key(3), (B, 1, 5)),  # e.g. an edit's reference image: in both
}
# A large unconditional velocity: v_u + 1 * (v_c - v_u) would then round away v_c's low bits.
UNCOND = {**COND, 'h': 300 * jax.random.normal(jax.random.key(6), (B, 4, 5))}


@jax.jit
def guided(z, s, cond, uncond, scale):
    return euler(cfg(conditional, cond, uncond, scale), z, s)


@jax.jit
def unguided(z, s, cond):
    return euler(lambda x, t: conditional(x, t, cond), z, s)


def test_cfg():
    s = sigmas(8, 3.0)
    x_c, x_u = unguided(Z, s, COND), unguided(Z, s, UNCOND)
    assert not np.allclose(x_c, x_u, atol=1e-2)
    np.testing.assert_array_equal(guided(Z, s, COND, UNCOND, 1.0), x_c)
    np.testing.assert_allclose(guided(Z, s, COND, UNCOND, 0.0), x_u, rtol=1e-6, atol=1e-6)
    t = jnp.full(B, 0.6)
    np.testing.assert_array_equal(cfg(conditional, COND, UNCOND, 1.0)(Z, t), conditional(Z, t, COND))
    # Guidance is linear in the velocity: scale 2 extrapolates.
    v2 = cfg(conditional, COND, UNCOND, 2.0)(Z, t)
    np.testing.assert_allclose(
        v2, 2 * conditional(Z, t, COND) - conditional(Z, t, UNCOND), rtol=1e-6, atol=1e-4
    )


def test_cfg_one_call_of_2b_per_step():
    batches = []

    def counted(x, t, c):
        jax.debug.callback(lambda x: batches.append(x.shape[0]), x)
        return conditional(x, t, c)

    steps = 5
    jax.jit(lambda z, s: euler(cfg(counted, COND, UNCOND, 4.0), z, s))(Z, sigmas(steps)).block_until_ready()
    jax.effects_barrier()
    assert batches == [2 * B] * steps


def test_noisy_target_loss():
    x, z = X_STAR, Z
    t = jnp.array([0.0, 0.3, 1.0])
    xt = fm.noisy(x, z, t)
    np.testing.assert_allclose(xt[0], x[0])
    np.testing.assert_allclose(xt[2], z[2])
    np.testing.assert_allclose(xt[1], 0.7 * x[1] + 0.3 * z[1], atol=1e-6)
    np.testing.assert_array_equal(fm.target(x, z), z - x)
    # d x_t / dt is the target.
    np.testing.assert_allclose(jax.jacfwd(lambda t: fm.noisy(x, z, t))(t).sum(-1), z - x, atol=1e-6)

    pred = fm.target(x, z) + 0.1 * jax.random.normal(jax.random.key(4), x.shape)
    per = ((pred - fm.target(x, z)) ** 2).reshape(B, -1).mean(1)
    w = jnp.array([1.0, 0.0, 3.0])
    full = fm.loss(pred, fm.target(x, z), w)
    np.testing.assert_allclose(full.value(), (per * w).sum() / w.sum(), rtol=1e-6)
    np.testing.assert_allclose(fm.loss(pred, fm.target(x, z)).value(), per.mean(), rtol=1e-6)
    # Two micro-batches (of unequal size) combine exactly into the full batch.
    a, b = fm.loss(pred[:1], fm.target(x, z)[:1], w[:1]), fm.loss(pred[1:], fm.target(x, z)[1:], w[1:])
    assert isinstance(full, Mean)
    np.testing.assert_allclose(Mean(a.total + b.total, a.weight + b.weight).value(), full.value(), rtol=1e-6)
    assert abs(float(a.value() + b.value()) / 2 - float(full.value())) > 1e-3  # naive averaging differs


def test_sample_time():
    key = jax.random.key(5)
    n = 100_000
    u = fm.sample_time(key, (n,))
    ln = fm.sample_time(key, (n,), 'logit_normal')
    ln_shifted = fm.sample_time(key, (n,), 'logit_normal', shift=3.0)
    for t in (u, ln, ln_shifted, fm.sample_time(key, (n,), 'logit_normal', mean=2.0, std=3.0, shift=5.0)):
        assert t.dtype == jnp.float32 and bool(jnp.all((t >= 0) & (t <= 1)))
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(jnp.median(ln)) - 0.5) < 0.01
    assert float(jnp.std(ln)) < float(jnp.std(u))  # logit-normal concentrates mid-range
    assert float(jnp.median(ln_shifted)) > 0.7  # shift 3 moves the median to 0.75
    assert bool(jnp.all(ln_shifted >= ln)) and float(ln_shifted.mean()) > float(ln.mean()) + 0.1
    assert abs(float(jnp.median(fm.sample_time(key, (n,), 'logit_normal', mean=1.0))) - 0.731) < 0.01
    np.testing.assert_array_equal(fm.shift_time(u, 1.0), u)
    with pytest.raises(ValueError, match='logit_normal'):
        fm.sample_time(key, (2,), 'lognormal')
