"""Chunked cross-entropy: the LM head + softmax CE over chunks of the sequence give the full
logits' loss and gradients, and no [B, T, V] array exists; the recipes' losses are unchanged."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import config as config_lib, recipes
from mmjax.objectives.cross_entropy import (
    chunked_token_cross_entropy,
    masked_chunked_cross_entropy,
    masked_cross_entropy,
)

B, T, D, V = 2, 12, 8, 50


def data(seed=0):
    a, b, c, d = jax.random.split(jax.random.key(seed), 4)
    h = jax.random.normal(a, (B, T, D))
    w = jax.random.normal(b, (D, V))
    t = jax.random.randint(c, (B, T), 0, V)
    m = jax.random.bernoulli(d, 0.7, (B, T))
    return h, w, t, m


def loss(chunk):
    def f(h, w, t, m):
        head = lambda x: (x @ w).astype(jnp.float32)  # noqa: E731
        if chunk < 0:
            return masked_cross_entropy(head(h), t, m)[0].value()
        return masked_chunked_cross_entropy(head, h, t, m, chunk)[0].value()

    return f


@pytest.mark.parametrize('chunk', [0, 4, 5, 12])  # 5: T padded to 15
def test_values_and_grads_equal_the_full_logits(chunk):
    h, w, t, m = data()
    want, want_g = jax.value_and_grad(loss(-1), argnums=(0, 1))(h, w, t, m)
    got, got_g = jax.value_and_grad(loss(chunk), argnums=(0, 1))(h, w, t, m)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for g, w_ in zip(got_g, want_g):
        np.testing.assert_allclose(g, w_, rtol=1e-5, atol=1e-6)
    ce = chunked_token_cross_entropy(lambda x: x @ w, h, t, chunk)
    assert ce.shape == (B, T)


def _shapes(jaxpr, out):
    for eqn in jaxpr.eqns:
        out.update(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, 'shape'))
        for p in eqn.params.values():
            for sub in p if isinstance(p, (list, tuple)) else [p]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    _shapes(sub.jaxpr, out)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    _shapes(sub, out)
    return out


def test_no_full_logits_forward_or_backward():
    h, w, t, m = data()
    largest = lambda f: max(
        np.prod(s) for s in _shapes(jax.make_jaxpr(jax.grad(f, (0, 1)))(h, w, t, m).jaxpr, set())
    )  # noqa: E731
    assert largest(loss(-1)) == B * T * V
    assert largest(loss(4)) == B * 4 * V  # one chunk's logits, forward and rematerialised backward


def test_mm1_loss_is_the_same_chunked():
    """MM1's loss and gradients with the LM head in chunks and the empty image slots skipped."""
    small = ['model.llm.depth=1', 'model.vision.depth=1', 'model.seq_len=64']
    cfg = config_lib.load('configs/mm1.py:tiny', ['data.components.caption.num_records=64', *small])
    recipe = recipes.get(cfg)
    params = nn.unbox(jax.jit(recipe.init)(jax.random.key(0)))['params']
    B_, L, K = 2, cfg.model.seq_len, cfg.model.image_slots
    rng = np.random.default_rng(0)
    tokens = rng.integers(recipe.fmt.image_id + 1, 100, (B_, L)).astype(np.int32)
    tokens[0, 1:17] = recipe.fmt.image_id  # one image in row 0's first slot; the other slots empty
    batch = {
        'tokens': tokens,
        'targets': np.roll(tokens, -1, 1),
        'loss_mask': (rng.random((B_, L)) < 0.8).astype(np.float32),
        'component': np.zeros((B_, L), np.int32),
        'tokens_segment_ids': np.repeat([[1] * 30 + [2] * 30 + [0] * (L - 60)], B_, 0).astype(np.int32),
        'tokens_positions': np.repeat([list(range(30)) * 2 + [0] * (L - 60)], B_, 0).astype(np.int32),
        'images': rng.integers(0, 255, (B_, K, 32, 32, 3)).astype(np.uint8),
        'images_segment_ids': np.array([[1, 0, 0, 0], [0, 0, 0, 0]], np.int32),
    }
    run = lambda: jax.jit(jax.value_and_grad(lambda p: recipe.loss(p, batch, None)[0].value()))(params)  # noqa: E731
    want, want_g = run()
    cfg.model.loss_chunk = 24  # 64 positions padded to 72
    recipe.model = recipe.model.clone(max_images=2)
    got, got_g = run()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
