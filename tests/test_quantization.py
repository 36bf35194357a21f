"""UniCode's VQ tokenizer maths: one training forward of vector-quantize-pytorch's VectorQuantize
(indices, EMA statistics, new codebook, commitment loss), a hand-computed k-means step, the
straight-through gradients, and the LLM-norm rescale and ramp."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.objectives import quantization as vq

N, D, K = 64, 8, 16


def _fixed(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, D)).astype(np.float32)
    embed = rng.normal(size=(K, D)).astype(np.float32)
    cluster_size = rng.uniform(0.5, 3.0, size=K).astype(np.float32)
    embed_avg = (embed * cluster_size[:, None] + 0.1 * rng.normal(size=(K, D))).astype(np.float32)
    return x, embed, cluster_size, embed_avg


def test_matches_vector_quantize_pytorch():
    import torch
    import vector_quantize_pytorch as vqp

    x, embed, cluster_size, embed_avg = _fixed()

    m = vqp.VectorQuantize(
        dim=D,
        codebook_size=K,
        decay=0.99,
        eps=1e-5,
        kmeans_init=False,
        threshold_ema_dead_code=0,
        commitment_weight=0.25,
        rotation_trick=False,
        straight_through=False,
        stochastic_sample_codes=False,
        learnable_codebook=False,
        ema_update=True,
        use_cosine_sim=False,
    ).train()
    cb = m._codebook
    with torch.no_grad():
        cb.embed.copy_(torch.from_numpy(embed)[None])
        cb.embed_avg.copy_(torch.from_numpy(embed_avg)[None])
        cb.cluster_size.copy_(torch.from_numpy(cluster_size)[None])
    xt = torch.from_numpy(x)[None].requires_grad_(True)  # [1, N, D]
    quantized, indices, loss = m(xt)

    # The lookup uses the codebook before the update.
    idx = vq.nearest(jnp.asarray(x), jnp.asarray(embed))
    np.testing.assert_array_equal(np.asarray(idx), indices[0].numpy())
    q, _ = vq.quantize(jnp.asarray(x), jnp.asarray(embed))
    np.testing.assert_allclose(np.asarray(q), quantized[0].detach().numpy(), atol=1e-6)
    np.testing.assert_allclose(float(vq.commitment_loss(jnp.asarray(x), q, 0.25)), loss.item(), rtol=1e-5)

    counts, sums = vq.ema_stats(jnp.asarray(x), idx, K)
    new_size, new_sum, new_codebook = vq.ema_update(
        jnp.asarray(cluster_size), jnp.asarray(embed_avg), counts, sums, 0.99, 1e-5
    )
    np.testing.assert_allclose(np.asarray(new_size), cb.cluster_size[0].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(new_sum), cb.embed_avg[0].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(new_codebook), cb.embed[0].numpy(), rtol=1e-5, atol=1e-6)
    # Not a no-op: the codebook moved.
    assert np.abs(cb.embed[0].numpy() - embed).max() > 1e-4


def test_ema_stats_sum_over_shards():
    x, embed, cluster_size, embed_avg = _fixed(1)
    x, embed = jnp.asarray(x), jnp.asarray(embed)
    idx = vq.nearest(x, embed)
    whole = vq.ema_stats(x, idx, K)
    halves = [vq.ema_stats(x[s], idx[s], K) for s in (slice(0, N // 2), slice(N // 2, None))]
    for w, a, b in zip(whole, *halves):
        np.testing.assert_allclose(np.asarray(w), np.asarray(a + b), atol=1e-5)
    np.testing.assert_allclose(float(whole[0].sum()), N)


def test_nearest_chunked_matches_dense():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(96, D)).astype(np.float32))  # random floats: no ties
    c = jnp.asarray(rng.normal(size=(K, D)).astype(np.float32))
    dense = np.asarray(vq.nearest(x, c))
    for chunk in (8, 32, 48, 96, 200):  # 96 and 200 (>= N) take the dense path
        np.testing.assert_array_equal(np.asarray(vq.nearest(x, c, chunk=chunk)), dense)
    np.testing.assert_array_equal(np.asarray(jax.jit(vq.nearest, static_argnums=2)(x, c, 32)), dense)
    with pytest.raises(ValueError, match="multiple"):
        vq.nearest(x, c, chunk=40)


def test_kmeans_step_by_hand():
    # Two clusters in 2-D; with decay 0 and eps 0 the new codes are the cluster means.
    x = jnp.array([[0.0, 0.0], [1.0, 0.0], [10.0, 10.0], [12.0, 10.0]])
    codebook = jnp.array([[0.0, 1.0], [9.0, 9.0]])
    idx = vq.nearest(x, codebook)
    np.testing.assert_array_equal(np.asarray(idx), [0, 0, 1, 1])
    counts, sums = vq.ema_stats(x, idx, 2)
    np.testing.assert_allclose(np.asarray(counts), [2, 2])
    np.testing.assert_allclose(np.asarray(sums), [[1, 0], [22, 20]])
    size, total, new = vq.ema_update(jnp.ones(2), jnp.zeros((2, 2)), counts, sums, decay=0.0, eps=0.0)
    np.testing.assert_allclose(np.asarray(size), [2, 2])
    np.testing.assert_allclose(np.asarray(total), [[1, 0], [22, 20]])
    np.testing.assert_allclose(np.asarray(new), [[0.5, 0.0], [11.0, 10.0]], rtol=1e-6)


def test_straight_through_and_commitment():
    x, embed, _, _ = _fixed(2)
    x, embed = jnp.asarray(x), jnp.asarray(embed)
    g = jax.grad(lambda x: vq.quantize(x, embed)[0].sum())(x)
    np.testing.assert_array_equal(np.asarray(g), np.ones_like(x))
    q, idx = vq.quantize(x, embed)
    np.testing.assert_allclose(np.asarray(q), np.asarray(embed[idx]), atol=1e-6)

    def loss(x, embed):
        return vq.commitment_loss(x, vq.quantize(x, embed)[0], beta=0.25)

    expected = 0.25 * np.mean((np.asarray(x) - np.asarray(embed)[np.asarray(idx)]) ** 2)
    np.testing.assert_allclose(float(loss(x, embed)), expected, rtol=1e-5)
    gx, gc = jax.grad(loss, argnums=(0, 1))(x, embed)
    np.testing.assert_array_equal(np.asarray(gc), 0)
    np.testing.assert_allclose(
        np.asarray(gx), 0.5 * (np.asarray(x) - np.asarray(embed)[np.asarray(idx)]) / x.size, atol=1e-7
    )


def test_rescale_blend_ramp():
    rng = np.random.default_rng(3)
    c, rows = jnp.asarray(rng.normal(size=(K, D))), jnp.asarray(rng.normal(size=(K, D)) * 5)
    r = vq.rescale_to(c, rows)
    np.testing.assert_allclose(np.linalg.norm(r, axis=-1), np.linalg.norm(rows, axis=-1), rtol=1e-5)
    cos = np.sum(np.asarray(r) * np.asarray(c), -1) / np.linalg.norm(r, axis=-1) / np.linalg.norm(c, axis=-1)
    np.testing.assert_allclose(cos, 1, rtol=1e-5)  # direction kept
    np.testing.assert_allclose(np.asarray(vq.blend(c, r, 0.0)), np.asarray(c))
    np.testing.assert_allclose(np.asarray(vq.blend(c, r, 1.0)), np.asarray(r))
    np.testing.assert_allclose(np.asarray(vq.blend(c, r, 0.25)), 0.75 * np.asarray(c) + 0.25 * np.asarray(r))
    steps = [0, 100, 150, 200, 1000]
    np.testing.assert_allclose([float(vq.ramp(s, 100, 200)) for s in steps], [0, 0, 0.5, 1, 1])
    np.testing.assert_allclose([float(vq.ramp(s, 100, 100)) for s in (99, 100)], [0, 1])
    assert jax.jit(vq.ramp, static_argnums=(1, 2))(jnp.int32(150), 100, 200) == 0.5
