"""UniCode's tokenizer pieces: stacked quantization (concat / cumsum shapes and maths), dead-code
restarts, code statistics, the VQ tokenizer's documented shapes and the code -> token-id map."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models import unicode, vq as vq_model
from mmjax.objectives import quantization as Q

K, E = 32, 8


def _data(seed=0, n=6, width=E):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(2, 3, n, width)).astype(np.float32), rng.normal(size=(K, E)).astype(np.float32)


def test_concat_quantizes_each_slice_with_the_shared_codebook():
    z, cb = _data(width=3 * E)
    agg, codes, inputs, q = Q.quantize_stacked(jnp.asarray(z), jnp.asarray(cb), 3, "concat")
    assert agg.shape == z.shape and codes.shape == (2, 3, 6, 3) and inputs.shape == q.shape == (2, 3, 6, 3, E)
    slices = z.reshape(-1, 3, E)
    d = ((slices[:, :, None] - cb[None, None]) ** 2).sum(-1)
    np.testing.assert_array_equal(np.asarray(codes).reshape(-1, 3), d.argmin(-1))
    np.testing.assert_allclose(np.asarray(agg).reshape(-1, 3, E), cb[d.argmin(-1)], atol=1e-6)


def test_cumsum_is_residual_quantization():
    z, cb = _data()
    agg, codes, inputs, q = Q.quantize_stacked(jnp.asarray(z), jnp.asarray(cb), 4, "cumsum")
    assert agg.shape == z.shape and codes.shape == (2, 3, 6, 4)
    r, total = z.reshape(-1, E), 0
    for d in range(4):  # float64 reference: each layer quantises the previous layers' residual
        i = ((r[:, None] - cb[None]) ** 2).sum(-1).argmin(-1)
        np.testing.assert_array_equal(np.asarray(codes).reshape(-1, 4)[:, d], i)
        np.testing.assert_allclose(np.asarray(inputs).reshape(-1, 4, E)[:, d], r, atol=1e-5)
        total, r = total + cb[i], r - cb[i]
    np.testing.assert_allclose(np.asarray(agg).reshape(-1, E), total, atol=1e-5)
    # straight through: the aggregate's gradient w.r.t. z is the identity
    g = jax.grad(lambda x: Q.quantize_stacked(x, jnp.asarray(cb), 4, "cumsum")[0].sum())(jnp.asarray(z))
    np.testing.assert_allclose(np.asarray(g), 1.0)


def test_stacked_rejects_wrong_widths():
    z, cb = _data(width=E + 1)
    for agg in ("concat", "cumsum"):
        with pytest.raises(ValueError, match="width"):
            Q.quantize_stacked(jnp.asarray(z), jnp.asarray(cb), 2, agg)
    with pytest.raises(ValueError, match="aggregate"):
        Q.quantize_stacked(jnp.asarray(z[..., :E]), jnp.asarray(cb), 1, "sum")


def test_restart_revives_only_dead_codes_deterministically():
    rng = np.random.default_rng(0)
    size = np.array([5.0, 0.1, 3.0, 0.0, 2.0] + [1.5] * 3, np.float32)
    sums = rng.normal(size=(8, E)).astype(np.float32) * size[:, None]
    key = jax.random.key(3)
    s1, e1 = Q.restart_dead(jnp.asarray(size), jnp.asarray(sums), key, threshold=1.0)
    s2, e2 = Q.restart_dead(jnp.asarray(size), jnp.asarray(sums), key, threshold=1.0)
    np.testing.assert_array_equal(np.asarray(e1), np.asarray(e2))  # same rng, same restarts
    live = size >= 1.0
    np.testing.assert_array_equal(np.asarray(s1)[live], size[live])
    np.testing.assert_array_equal(np.asarray(e1)[live], sums[live])
    np.testing.assert_array_equal(np.asarray(s1)[~live], 1.0)
    means = sums[live] / size[live, None]
    for k in np.flatnonzero(~live):  # each revived code sits next to a live code's mean
        dist = np.linalg.norm(means - np.asarray(e1)[k], axis=1)
        assert dist.min() < 0.05 * np.linalg.norm(means, axis=1)[dist.argmin()] + 1e-3
    # nothing live: nothing to copy, nothing changes
    s3, e3 = Q.restart_dead(jnp.zeros(8), jnp.asarray(sums), key, threshold=1.0)
    np.testing.assert_array_equal(np.asarray(e3), sums)


def test_code_stats():
    s = Q.code_stats(jnp.array([2.0, 2.0, 0.0, 0.0]))
    np.testing.assert_allclose([s["usage"], s["perplexity"], s["top_share"]], [0.5, 2.0, 0.5], rtol=1e-6)
    s = Q.code_stats(jnp.array([4.0, 0.0, 0.0, 0.0]))
    np.testing.assert_allclose([s["usage"], s["perplexity"], s["top_share"]], [0.25, 1.0, 1.0], rtol=1e-6)


@pytest.mark.parametrize("aggregate,width", [("concat", 2 * E), ("cumsum", E)])
def test_tokenizer_shapes(aggregate, width):
    m = vq_model.VQTokenizer(
        code_width=E,
        depth=2,
        aggregate=aggregate,
        block_out_channels=(8, 8, 8),
        latent_channels=4,
        norm_num_groups=4,
    )
    images = jnp.zeros((2, 16, 16, 3))
    cb = jnp.asarray(_data()[1])
    params = m.init(jax.random.key(0), images, cb)["params"]
    z = m.apply({"params": params}, images, method=m.features)
    assert z.shape == (2, 4, 4, width) and m.downsample_factor == 4
    agg, codes, _, _ = m.apply({"params": params}, z, cb, method=m.quantize)
    assert agg.shape == (2, 4, 4, width) and codes.shape == (2, 4, 4, 2)
    again = m.apply({"params": params}, codes, cb, method=m.embed_codes)
    np.testing.assert_allclose(np.asarray(again), np.asarray(agg), atol=1e-5)  # codes alone give it back
    recon = m.apply({"params": params}, agg, method=m.decode)
    assert recon.shape == images.shape


def test_code_token_ids():
    table = jnp.asarray(np.random.default_rng(0).normal(size=(20, 4)), jnp.float32)
    ids = np.asarray(unicode.code_token_ids(table, 5))
    norms = np.linalg.norm(np.asarray(table), axis=1)
    np.testing.assert_array_equal(ids, np.sort(np.argsort(-norms)[:5]))
    np.testing.assert_array_equal(np.asarray(unicode.code_token_ids(table, 20)), np.arange(20))
