"""Decoder LLM: logical axes, scan/remat, packed sequences, padding, embeddings input, vocab growth."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from mmjax.models.llm import LLM, resize_vocab, stack_layers, unstack_layers
from mmjax.models.rope import apply_rope, cos_sin

TINY = dict(vocab_size=128, width=64, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=128)
TOKENS = jax.random.randint(jax.random.key(0), (2, 12), 0, 128)
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope='module')
def params():
    """fp32 params of LLM(**TINY), scaled up so the model is far from uniform."""
    p = nn.unbox(jax.jit(LLM(**TINY).init)(jax.random.key(1), TOKENS))['params']
    return jax.tree.map(lambda x: 3 * x, p)


@functools.cache
def _apply(model):
    return jax.jit(lambda p, kw: model.apply({'params': p}, **kw))


def run(params, model=LLM(**TINY), **kw):
    return _apply(model)(params, kw)


def test_param_axes():
    boxed = jax.eval_shape(LLM(**TINY, qkv_bias=True).init, jax.random.key(0), TOKENS)['params']
    names = {
        '/'.join(k): v.names
        for k, v in traverse_util.flatten_dict(
            boxed, is_leaf=lambda _, x: isinstance(x, nn.Partitioned)
        ).items()
    }
    block = 'decoder/block_0/'
    assert names['embedder/embedding'] == ('vocab', 'embed')
    assert names[block + 'attn/q/kernel'] == ('embed', 'heads', 'kv')
    assert names[block + 'attn/q/bias'] == ('heads', 'kv')
    assert names[block + 'attn/out/kernel'] == ('heads', 'kv', 'embed')
    assert names[block + 'mlp/wg/kernel'] == ('embed', 'mlp')
    assert names[block + 'mlp/wo/kernel'] == ('mlp', 'embed')
    assert names['lm_head/kernel'] == ('embed', 'vocab')
    assert boxed['decoder']['block_0']['attn']['k']['kernel'].value.shape == (64, 2, 16)  # GQA
    tied = jax.eval_shape(LLM(**TINY, tie_embeddings=True).init, jax.random.key(0), TOKENS)['params']
    assert 'lm_head' not in tied
    scanned = jax.eval_shape(LLM(**TINY, scan=True).init, jax.random.key(0), TOKENS)['params']
    assert scanned['decoder']['blocks']['attn']['q']['kernel'].names == ('layers', 'embed', 'heads', 'kv')


def test_scan_and_remat_match(params):
    ref, aux = run(params, tokens=TOKENS)
    assert ref.shape == (2, 12, 128) and ref.dtype == jnp.float32 and aux['hidden'].shape == (2, 12, 64)
    stacked = stack_layers(params, TINY['depth'])
    for model in (LLM(**TINY, scan=True), LLM(**TINY, scan=True, remat='nothing_saveable')):
        np.testing.assert_allclose(run(stacked, model, tokens=TOKENS)[0], ref, **TOL)
    np.testing.assert_allclose(run(params, LLM(**TINY, remat='dots_saveable'), tokens=TOKENS)[0], ref, **TOL)
    back = unstack_layers(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)))


def test_embeddings_input_equals_tokens(params):
    model = LLM(**TINY)
    emb = model.apply({'params': params}, TOKENS, method='embed')
    assert emb.shape == (2, 12, 64)
    np.testing.assert_allclose(run(params, embeddings=emb)[0], run(params, tokens=TOKENS)[0], **TOL)


def test_causal_and_padding(params):
    ref = run(params, tokens=TOKENS)[0]
    changed = TOKENS.at[:, 8:].set((TOKENS[:, 8:] + 1) % 128)
    np.testing.assert_allclose(run(params, tokens=changed)[0][:, :8], ref[:, :8], **TOL)  # no peeking ahead
    assert not np.allclose(run(params, tokens=changed)[0][:, 8:], ref[:, 8:], atol=1e-3)
    # left padding: with positions counting real tokens only, a padded row equals the row alone
    padded = jnp.concatenate([jnp.zeros((2, 3), TOKENS.dtype), TOKENS], axis=1)
    mask = jnp.arange(15)[None] >= 3
    positions = jnp.maximum(jnp.arange(15) - 3, 0)[None].repeat(2, 0)
    out = run(params, tokens=padded, attention_mask=mask.repeat(2, 0), positions=positions)[0]
    np.testing.assert_allclose(out[:, 3:], ref, atol=1e-4, rtol=1e-4)


def test_packed_documents_are_isolated(params):
    """Two documents packed in one row: segment_ids stop cross-document attention, and positions
    restarting at each document give exactly the outputs of each document run alone."""
    a, b = TOKENS[0, :5], TOKENS[1, :7]
    packed = jnp.concatenate([a, b])[None]
    segments = jnp.array([[1] * 5 + [2] * 7])
    positions = jnp.concatenate([jnp.arange(5), jnp.arange(7)])[None]
    out = run(params, tokens=packed, segment_ids=segments, positions=positions)[0]
    np.testing.assert_allclose(out[0, :5], run(params, tokens=a[None])[0][0], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(out[0, 5:], run(params, tokens=b[None])[0][0], atol=1e-4, rtol=1e-4)
    # changing document a leaves document b's outputs unchanged (continuing positions too)
    other = packed.at[0, :5].set((a + 7) % 128)
    for pos in (positions, None):
        x = run(params, tokens=packed, segment_ids=segments, positions=pos)[0]
        y = run(params, tokens=other, segment_ids=segments, positions=pos)[0]
        np.testing.assert_allclose(x[0, 5:], y[0, 5:], **TOL)
        assert not np.allclose(x[0, :5], y[0, :5], atol=1e-3)
    leaky = run(params, tokens=other, positions=positions)[0]  # without segment_ids b sees a
    assert not np.allclose(leaky[0, 5:], out[0, 5:], atol=1e-3)


def test_rope_rotates_pairs_and_is_relative():
    """RoPE is a rotation (norms kept) and q.k depends only on the position difference."""
    x = jax.random.normal(jax.random.key(2), (1, 2, 1, 16))
    pos = jnp.array([[3, 10], [20, 27]])
    rot = [apply_rope(x, *cos_sin(p[None], 16, 10_000.0)) for p in pos]
    np.testing.assert_allclose(jnp.linalg.norm(rot[0], axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
    dots = [jnp.sum(r[0, 0] * r[0, 1]) for r in rot]
    np.testing.assert_allclose(dots[0], dots[1], rtol=1e-4)
    assert not np.allclose(rot[0], x, atol=1e-3)


def test_resize_vocab_keeps_old_tokens(params):
    grown = resize_vocab(params, 136, jax.random.key(3))
    table = grown['embedder']['embedding']
    assert table.shape == (136, 64) and grown['lm_head']['kernel'].shape == (64, 136)
    np.testing.assert_array_equal(table[:128], params['embedder']['embedding'])
    np.testing.assert_allclose(table[128:], np.broadcast_to(table[:128].mean(0), (8, 64)), atol=0.05)
    assert not np.allclose(table[128], table[129])  # new tokens are distinguishable
    old = run(params, tokens=TOKENS)[0]
    new = run(grown, LLM(**{**TINY, 'vocab_size': 136}), tokens=TOKENS)[0]
    np.testing.assert_allclose(new[..., :128], old, **TOL)
    tied = nn.unbox(jax.jit(LLM(**TINY, tie_embeddings=True).init)(jax.random.key(1), TOKENS))['params']
    assert 'lm_head' not in resize_vocab(tied, 130, jax.random.key(0))
    with pytest.raises(ValueError, match='grows'):
        resize_vocab(params, 100, jax.random.key(0))


def test_bf16_compute_is_close(params):
    out = run(params, LLM(**TINY, dtype=jnp.bfloat16), tokens=TOKENS)[0]
    ref = run(params, tokens=TOKENS)[0]
    assert out.dtype == jnp.float32
    assert float(jnp.mean(jnp.abs(out - ref))) < 0.05 * float(jnp.mean(jnp.abs(ref)))
