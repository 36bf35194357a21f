"""The VLM encodes only the non-empty image slots (a static budget per batch, split over the batch's
shards) and gives the same visual tokens as encoding every slot, budget overflow included."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mm1 as mm1_config
from mmjax.models import vlm

B, K, S = 4, 3, 32


@pytest.fixture(scope='module')
def model():
    mc = mm1_config.get_config('tiny').model
    mc.llm.depth, mc.vision.depth = 1, 1
    m = vlm.build(mc, 300, 4)
    images = jax.random.uniform(jax.random.key(0), (B, K, S, S, 3), minval=-1, maxval=1)
    params = jax.jit(m.init)(jax.random.key(1), jnp.zeros((1, 8), jnp.int32), images[:1, :1])['params']
    full = jax.jit(lambda p: m.apply({'params': p}, images, method=vlm.VLM.encode_images))(params)
    return m, params, images, full


def encode(m, params, images, valid, budget):
    f = lambda p, i, v: m.clone(max_images=budget).apply({'params': p}, i, v, method=vlm.VLM.encode_slots)  # noqa: E731
    return jax.jit(f)(params, images, valid)


@pytest.mark.parametrize('budget', [4, 2])  # 2 < the 3 valid slots: every slot is encoded instead
def test_valid_slots_read_as_if_every_slot_were_encoded(model, budget):
    m, params, images, full = model
    valid = jnp.array([[1, 1, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0]], bool)
    got = encode(m, params, images, valid, budget)
    assert got.shape == full.shape
    np.testing.assert_allclose(
        jnp.where(valid[..., None, None], got, 0), jnp.where(valid[..., None, None], full, 0), atol=1e-5
    )
    if budget >= valid.sum():
        assert float(jnp.abs(got[~valid]).max()) == 0  # the empty slots were not encoded


def test_budget_splits_over_batch_shards(model):
    m, params, images, full = model
    mesh = jax.make_mesh((2,), ('data',), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:2])
    for valid, skipped in (
        ([[1, 1, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0]], True),
        ([[1, 1, 0], [1, 0, 0], [0] * 3, [0] * 3], False),
    ):
        valid = jnp.array(valid, bool)
        with jax.set_mesh(mesh), nn.logical_axis_rules((('batch', 'data'),)):
            got = encode(m, params, images, valid, 4)  # 2 per shard of 2 rows
        np.testing.assert_allclose(
            jnp.where(valid[..., None, None], got, 0), jnp.where(valid[..., None, None], full, 0), atol=1e-5
        )
        assert (float(jnp.abs(got[~valid]).max()) == 0) == skipped  # the second overflows shard 0
