"""Attention kernels: segment ids + causality instead of a dense mask give the dense path's values
(the XLA reference; cuDNN's packed-layout arguments; splash attention in Pallas interpret mode)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.cudnn import fused_attention_stablehlo as fa

from mmjax.models import layers
from mmjax.models.llm import LLM, init_cache, make_mask

B, T, N, K, H = 2, 128, 4, 2, 16
RUNS = ([40, 50, 20, 18], [70, 30, 28])  # packed rows: documents 1, 2, ..., then padding (0)
SEG = jnp.asarray(np.stack([np.repeat([*range(1, len(r)), 0], r) for r in RUNS]), jnp.int32)
POS = jnp.asarray(np.stack([np.concatenate([np.arange(n) for n in r]) for r in RUNS]), jnp.int32)
TINY = dict(vocab_size=64, width=32, depth=1, num_heads=N, num_kv_heads=K, mlp_dim=64)
TOKENS = jax.random.randint(jax.random.key(3), (B, T), 0, 64)
PARAMS = LLM(**TINY).init(jax.random.key(1), TOKENS[:, :8])['params']


def run(attention='xla', n=T, **kw):
    """Logits (and aux) of LLM(**TINY, attention=attention) on the first n tokens, jitted."""
    model = LLM(**TINY, attention=attention)
    return jax.jit(lambda p, kw: model.apply({'params': p}, TOKENS[:, :n], **kw))(PARAMS, kw)


def qkv(seed=0):
    a, b, c = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(a, (B, T, N, H)),
        jax.random.normal(b, (B, T, K, H)),
        jax.random.normal(c, (B, T, K, H)),
    )


def dense(q, k, v, seg=SEG):
    mask = make_mask(jnp.arange(T), jnp.ones((B, T), bool), seg)[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask)


def cudnn_reference(q, k, v, *, q_seqlen, kv_seqlen, q_offsets, kv_offsets, scale, mask_type, qkv_layout):
    """What cuDNN's packed (THD) call computes, on XLA: each (offset, seqlen) run attends within
    itself, causally for PADDING_CAUSAL."""
    t = jnp.arange(T)
    inside = (t[None, None] >= q_offsets[:, :-1, None]) & (
        t[None, None] < (q_offsets[:, :-1] + q_seqlen)[..., None]
    )
    inside = inside & (q_seqlen[..., None] > 0)  # [B, M, T]
    same = jnp.einsum('bmt,bms->bts', inside.astype(jnp.int32), inside.astype(jnp.int32)) > 0
    if mask_type == fa.MaskType.PADDING_CAUSAL:
        same = same & jnp.tril(jnp.ones((T, T), bool))
    assert qkv_layout == 'BTNH'
    return jax.nn.dot_product_attention(q, k, v, mask=same[:, None], scale=scale)


def test_auto_is_the_dense_path_on_cpu():
    assert layers.attention_impl('auto') == 'xla'
    with pytest.raises(ValueError, match='flash'):
        layers.attention_impl('flash')
    with pytest.raises(ValueError, match='attention='):
        LLM(**TINY, attention='flash')


def test_segment_ids_on_xla_equal_the_dense_mask():
    q, k, v = qkv()
    got = layers.dot_product_attention(q, k, v, is_causal=True, segment_ids=SEG)
    np.testing.assert_allclose(got, dense(q, k, v), atol=1e-6)
    # a row of one document padded at the end: jax.nn's seq-length form (cuDNN's unpacked one)
    lens = jnp.array([100, 128], jnp.int32)
    pad = (jnp.arange(T)[None] < lens[:, None]).astype(jnp.int32)
    ref = jax.nn.dot_product_attention(
        q, k, v, is_causal=True, query_seq_lengths=lens, key_value_seq_lengths=lens, implementation='xla'
    )
    real = (pad > 0)[..., None, None]
    np.testing.assert_allclose(jnp.where(real, dense(q, k, v, pad), 0), jnp.where(real, ref, 0), atol=1e-6)


def test_packed_offsets_describe_the_segments():
    seqlen, offsets = layers.packed_offsets(SEG)
    assert seqlen.shape == (B, T) and offsets.shape == (B, T + 1) and seqlen.dtype == jnp.int32
    for r, runs in enumerate(RUNS):
        n = len(runs)
        np.testing.assert_array_equal(seqlen[r, :n], runs)
        np.testing.assert_array_equal(offsets[r, :n], np.cumsum([0, *runs[:-1]]))
        assert (seqlen[r, n:] == -1).all() and (offsets[r, n:] == -1).all()


def test_cudnn_path_passes_packed_segments_and_matches_dense(monkeypatch):
    """The 'cudnn' path's arguments (packed layout, PADDING_CAUSAL) through a reference of the
    kernel: the same values as the dense mask, for attention and a whole LLM."""
    calls = []

    def fake(q, k, v, **kw):
        calls.append(kw['mask_type'])
        return cudnn_reference(q, k, v, **kw)

    monkeypatch.setattr(fa, 'dot_product_attention', fake)
    q, k, v = qkv()
    got = layers.dot_product_attention(q, k, v, is_causal=True, segment_ids=SEG, implementation='cudnn')
    np.testing.assert_allclose(got, dense(q, k, v), atol=1e-6)
    assert calls == [fa.MaskType.PADDING_CAUSAL]
    want, _ = run(positions=POS, segment_ids=SEG)
    np.testing.assert_allclose(run('cudnn', positions=POS, segment_ids=SEG)[0], want, atol=1e-5)


def test_splash_interpret_matches_dense_values_and_grads():
    q, k, v = qkv(1)
    splash = lambda q, k, v: layers.dot_product_attention(  # noqa: E731
        q, k, v, is_causal=True, segment_ids=SEG, implementation='splash'
    )
    np.testing.assert_allclose(splash(q, k, v), dense(q, k, v), atol=1e-5)
    loss = lambda f: lambda *a: (f(*a) ** 2).sum()  # noqa: E731
    got = jax.grad(loss(splash), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(dense), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-4)


def test_splash_under_a_mesh_shards_batch_and_heads():
    q, k, v = qkv(2)
    auto = (jax.sharding.AxisType.Auto,) * 2  # as parallel.make_mesh
    mesh = jax.make_mesh((2, 2), ('data', 'tensor'), axis_types=auto, devices=jax.devices()[:4])
    rules = (('batch', 'data'), ('act_heads', 'tensor'))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        f = jax.jit(
            lambda q, k, v: layers.dot_product_attention(
                q, k, v, is_causal=True, segment_ids=SEG, implementation='splash'
            )
        )
        got = f(q, k, v)
    np.testing.assert_allclose(got, dense(q, k, v), atol=1e-5)


def test_llm_on_splash_keeps_real_tokens_and_decoding():
    want, _ = run(positions=POS, segment_ids=SEG)
    np.testing.assert_allclose(run('splash', positions=POS, segment_ids=SEG)[0], want, atol=1e-5)
    # padding as attention_mask (no segments): the same logits at the real tokens
    keys = jnp.arange(T)[None] < jnp.array([[100], [128]])
    real = lambda x: jnp.where(keys[..., None], x, 0)  # noqa: E731
    got, want = (run(a, attention_mask=keys)[0] for a in ('splash', 'xla'))
    np.testing.assert_allclose(real(got), real(want), atol=1e-5)
    # scanned and rematerialised blocks (one kernel, built once, for every layer and the backward)
    scanned = LLM(**{**TINY, 'depth': 2}, scan=True, remat='nothing_saveable', attention='splash')
    p2 = nn.unbox(jax.jit(scanned.init)(jax.random.key(4), TOKENS[:, :8]))['params']

    def loss(model):
        return jax.jit(
            jax.value_and_grad(lambda p: (model.apply({'params': p}, TOKENS, segment_ids=SEG)[0] ** 2).mean())
        )

    got, want = loss(scanned)(p2), loss(scanned.clone(attention='xla'))(p2)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
    # cached decoding takes the dense path whatever the attention
    fused = LLM(**TINY, attention='splash')
    step = run('splash', n=8, cache=init_cache(fused, B, 16))[1]['cache']
    got, _ = fused.apply({'params': PARAMS}, TOKENS[:, 8:9], cache=step)
    np.testing.assert_allclose(got[:, 0], run(n=9)[0][:, 8], atol=1e-5)
