"""CLIP's contrastive loss: open_clip's formula in float64, closed forms, and the 8-device
batch-sharded loss and gradients (row-sharded logits) against one device."""

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mmjax.objectives import contrastive


def normalized(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def open_clip_loss_and_grads(image, text, scale):
    """open_clip's ClipLoss (world_size 1) in float64 and its analytic gradients."""
    n = len(image)

    def ce_and_grad(logits):  # mean CE against arange(n), and d(mean CE)/d(logits)
        z = logits - logits.max(axis=1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        ce = -np.log(p[np.arange(n), np.arange(n)]).mean()
        return ce, (p - np.eye(n)) / n

    per_image, per_text = image @ text.T, text @ image.T
    ce_i, g_i = ce_and_grad(scale * per_image)
    ce_t, g_t = ce_and_grad(scale * per_text)
    g_i, g_t = g_i / 2, g_t / 2
    d_image = scale * (g_i @ text + g_t.T @ text)
    d_text = scale * (g_i.T @ image + g_t @ image)
    d_scale = (g_i * per_image).sum() + (g_t * per_text).sum()
    return (ce_i + ce_t) / 2, (d_image, d_text, d_scale)


loss_and_grads = jax.value_and_grad(contrastive.clip_loss, argnums=(0, 1, 2))


@pytest.mark.parametrize("n", [2, 7, 32])
def test_matches_open_clip_float64(n):
    rng = np.random.default_rng(n)
    image, text = (normalized(rng.normal(size=(n, 16))) for _ in range(2))
    for scale in [1.0, 1 / 0.07, 100.0]:
        want, want_grads = open_clip_loss_and_grads(image, text, scale)
        got, got_grads = loss_and_grads(jnp.float32(image), jnp.float32(text), jnp.float32(scale))
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=1e-5)
        for g, w in zip(got_grads, want_grads):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(w).max()))


def test_closed_forms():
    n, s = 8, 5.0
    same = jnp.tile(jnp.float32(normalized(np.arange(1.0, 17.0)))[None], (n, 1))
    np.testing.assert_allclose(contrastive.clip_loss(same, same, s), math.log(n), rtol=1e-6)
    q = np.linalg.qr(np.random.default_rng(0).normal(size=(16, 16)))[0][:n]  # orthonormal rows
    want = math.log(1 + (n - 1) * math.exp(-s))
    np.testing.assert_allclose(contrastive.clip_loss(jnp.float32(q), jnp.float32(q), s), want, rtol=1e-5)


def test_logit_scale_conventions():
    np.testing.assert_allclose(math.exp(contrastive.LOGIT_SCALE_INIT), 1 / 0.07)
    np.testing.assert_allclose(math.exp(contrastive.clamp_logit_scale(10.0)), 100.0, rtol=1e-6)
    assert contrastive.clamp_logit_scale(1.0) == 1.0


def projected_loss(params, image_x, text_x):
    """A model's last step: linear projections, L2 normalisation, the learnable clamped scale."""
    norm = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    scale = jnp.exp(contrastive.clamp_logit_scale(params["logit_scale"]))
    return contrastive.clip_loss(norm(image_x @ params["image"]), norm(text_x @ params["text"]), scale)


def test_sharded_matches_one_device():
    """On 8 devices (batch over 'data'), the loss and gradients equal one device's, and each
    device's logits are its (B/8) x B rows: no B x B buffer in the compiled gradient."""
    n, d, d_in = 64, 12, 20
    rng = np.random.default_rng(0)
    image, text = (jnp.float32(normalized(rng.normal(size=(n, d)))) for _ in range(2))
    image_x, text_x = (jnp.float32(rng.normal(size=(n, d_in))) for _ in range(2))
    params = {
        "image": jnp.float32(rng.normal(size=(d_in, d))),
        "text": jnp.float32(rng.normal(size=(d_in, d))),
        "logit_scale": jnp.float32(contrastive.LOGIT_SCALE_INIT),
    }
    scale = jnp.float32(1 / 0.07)
    # fresh jits for each side: Flax's logical rules are read at trace time and are not part of
    # jax's trace cache key
    steps = lambda: (jax.jit(loss_and_grads), jax.jit(jax.value_and_grad(projected_loss)))
    emb_step, model_step = steps()
    want_emb = emb_step(image, text, scale)
    want_model = model_step(params, image_x, text_x)
    emb_step, model_step = steps()

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = NamedSharding(mesh, P("data"))
    with jax.set_mesh(mesh), nn.logical_axis_rules([("batch", "data")]):
        sharded = [jax.device_put(x, rows) for x in (image, text, image_x, text_x)]
        compiled = emb_step.lower(sharded[0], sharded[1], scale).compile()
        got_emb = compiled(sharded[0], sharded[1], scale)
        got_model = model_step(jax.device_put(params, NamedSharding(mesh, P())), *sharded[2:])

    assert got_emb[1][0].sharding.spec[0] == "data"  # the embeddings' gradient stays row-sharded
    for got, want in [(got_emb, want_emb), (got_model, want_model)]:
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)

    shapes = set(re.findall(r"\b[a-z]+\d*\[(\d+),(\d+)\]", compiled.as_text()))
    assert (str(n // 8), str(n)) in shapes, shapes  # this device's rows of a logits matrix
    assert (str(n), str(n)) not in shapes, shapes  # no full B x B matrix of any dtype
