"""Shared layers and ViT: shapes, logical axes, scan/remat equivalence, attention, posemb, training."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmjax.models.layers import Attention, LayerNorm, Mlp, RMSNorm, interpolate_posemb, sincos2d_posemb
from mmjax.models.vit import ViT

TINY = dict(patch_size=8, width=32, depth=2, num_heads=2)
KW = dict(**TINY, num_classes=3, head_zero_init=False)  # the reference model (non-zero logits)
X = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
PARAM_NAMES = {'embed', 'mlp', 'heads', 'kv', 'vocab', 'patch', 'layers', None}


def init(model, x=X):
    return nn.unbox(jax.jit(model.init)(jax.random.key(0), x))


def stack_blocks(params):
    """Unscanned block_{i} params -> the scanned `blocks` layout (leading layers axis)."""
    p = params['params']
    blocks = jax.tree.map(
        lambda *xs: jnp.stack(xs), *[p['encoder'][f'block_{i}'] for i in range(TINY['depth'])]
    )
    return {'params': {**p, 'encoder': {'blocks': blocks}}}


def value_and_grad(model, params):
    """((sum(out**2), out), grads) of model.apply(params, X), jitted."""

    def loss(p):
        out = model.apply(p, X)[0]
        return jnp.sum(out**2), out

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


@pytest.fixture(scope='module')
def ref():
    """Unscanned fp32 reference: (params, ((loss, out), grads))."""
    params = init(ViT(**KW))
    return params, value_and_grad(ViT(**KW), params)


@pytest.mark.parametrize('pool', ['gap', 'cls', 'map', 'none'])
def test_shapes(pool):
    for class_token in [True] if pool == 'cls' else [False, True]:
        for num_classes in [0] if pool == 'none' else [0, 5]:
            model = ViT(**TINY, pool=pool, class_token=class_token, num_classes=num_classes)
            variables = jax.eval_shape(model.init, jax.random.key(0), X)
            out, aux = jax.eval_shape(model.apply, variables, X)
            assert aux['patches'].shape == (2, 16, 32)
            assert ('pooled' in aux) == (pool != 'none')
            if pool != 'none':
                assert aux['pooled'].shape == (2, 32)
            assert out.shape == ((2, 5) if num_classes else (2, 16, 32) if pool == 'none' else (2, 32))
            assert ('logits' in aux) == bool(num_classes)


def test_bf16_close_to_fp32(ref):
    params, ((_, out32), _) = ref
    out16 = jax.jit(ViT(**KW, dtype=jnp.bfloat16).apply)(params, X)[0]
    assert out16.dtype == jnp.bfloat16 and np.isfinite(np.asarray(out16, np.float32)).all()
    np.testing.assert_allclose(np.asarray(out16, np.float32), out32, atol=0.1, rtol=0.05)


@pytest.mark.parametrize('scan', [False, True])
def test_logical_partition_specs(scan):
    model = ViT(**TINY, pool='map', class_token=True, pre_norm=True, num_classes=5, scan=scan)
    abstract = jax.eval_shape(model.init, jax.random.key(0), X)['params']
    boxed = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert all(isinstance(x, nn.LogicallyPartitioned) for x in boxed), 'every param must carry logical axes'
    specs = nn.get_partition_spec(abstract)
    flat = jax.tree_util.tree_flatten_with_path(
        specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
    )[0]
    shapes = jax.tree.leaves(nn.unbox(abstract))
    for (path, spec), shape in zip(flat, shapes):
        assert len(spec) == len(shape.shape) and set(spec) <= PARAM_NAMES, (path, spec)
    blocks = specs['encoder']['blocks' if scan else 'block_0']
    lead = ('layers',) if scan else ()
    assert blocks['attn']['q']['kernel'] == jax.sharding.PartitionSpec(*lead, 'embed', 'heads', 'kv')
    assert blocks['attn']['out']['kernel'] == jax.sharding.PartitionSpec(*lead, 'heads', 'kv', 'embed')
    assert blocks['mlp']['wi']['kernel'] == jax.sharding.PartitionSpec(*lead, 'embed', 'mlp')
    assert blocks['mlp']['wo']['kernel'] == jax.sharding.PartitionSpec(*lead, 'mlp', 'embed')
    assert specs['embedding']['kernel'] == jax.sharding.PartitionSpec('patch', 'embed')
    assert specs['head']['kernel'] == jax.sharding.PartitionSpec('embed', 'vocab')


def test_norms_carry_embed_axis():
    x = jnp.ones((2, 3, 8))
    for norm in [LayerNorm(), RMSNorm()]:
        specs = nn.get_partition_spec(jax.eval_shape(norm.init, jax.random.key(0), x))['params']
        assert set(jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))) == {
            jax.sharding.PartitionSpec('embed')
        }


def assert_same_outputs_and_grads(params, model, expected):
    """model on params gives the same (loss, out) and grads as `expected` (the unscanned reference)."""
    ((loss, out), grads), ((ref_loss, ref_out), ref_grads) = value_and_grad(model, params), expected
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), grads, ref_grads)


def test_scan_is_layout_only(ref):
    params, ((loss, out), grads) = ref
    assert_same_outputs_and_grads(
        stack_blocks(params), ViT(**KW, scan=True), ((loss, out), stack_blocks(grads))
    )


@pytest.mark.parametrize(
    'scan,policy', [(False, 'nothing_saveable'), (False, 'full'), (True, 'dots'), (True, 'offload')]
)
def test_remat_same_outputs_and_grads(ref, scan, policy):
    params, ((loss, out), grads) = ref
    if scan:
        params, grads = stack_blocks(params), stack_blocks(grads)
    assert_same_outputs_and_grads(params, ViT(**KW, scan=scan, remat=policy), ((loss, out), grads))


def test_gqa_matches_naive_reference():
    x = jax.random.normal(jax.random.key(2), (2, 6, 32))
    attn = Attention(num_heads=4, num_kv_heads=2, head_dim=8)
    p = init(attn, x)['params']
    assert p['k']['kernel'].shape == (32, 2, 8) and p['q']['kernel'].shape == (32, 4, 8)

    @jax.jit
    def naive(p, x):  # kv head j serves query heads [2j, 2j+1]
        proj = lambda n: jnp.einsum('btd,dhk->bthk', x, p[n]['kernel']) + p[n]['bias']  # noqa: E731
        q, k, v = proj('q'), jnp.repeat(proj('k'), 2, axis=2), jnp.repeat(proj('v'), 2, axis=2)
        w = jax.nn.softmax(jnp.einsum('bthk,bshk->bhts', q, k) / np.sqrt(8), axis=-1)
        return (
            jnp.einsum('bthk,hkd->btd', jnp.einsum('bhts,bshk->bthk', w, v), p['out']['kernel'])
            + p['out']['bias']
        )

    np.testing.assert_allclose(jax.jit(attn.apply)({'params': p}, x), naive(p, x), atol=1e-5, rtol=1e-5)


def test_causal_mask():
    x = jax.random.normal(jax.random.key(3), (2, 6, 32))
    attn = Attention(num_heads=2)
    v = init(attn, x)
    apply = jax.jit(attn.apply, static_argnames='is_causal')
    y = apply(v, x, is_causal=True)
    mask = jnp.tril(jnp.ones((6, 6), bool))[None, None]
    np.testing.assert_allclose(apply(v, x, mask=mask), y, atol=1e-6)
    # Changing the future leaves the past untouched.
    y2 = apply(v, x.at[:, 4:].set(7.0), is_causal=True)
    np.testing.assert_allclose(y2[:, :4], y[:, :4], atol=1e-6)
    assert not np.allclose(y2[:, 4:], y[:, 4:])


def test_cross_attention_shapes():
    q, kv = jnp.ones((2, 5, 32)), jnp.ones((2, 7, 24))
    attn = Attention(num_heads=4, head_dim=16, out_dim=48)
    p = nn.unbox(jax.eval_shape(attn.init, jax.random.key(0), q, kv))
    assert jax.eval_shape(attn.apply, p, q, kv).shape == (2, 5, 48)
    assert p['params']['k']['kernel'].shape == (24, 4, 16)


def test_mlp_gated_and_activations():
    x = jax.random.normal(jax.random.key(4), (2, 3, 8))
    for act in ['gelu', 'gelu_tanh', 'quick_gelu', 'silu']:
        mlp = Mlp(16, act=act, gated=True)
        variables = jax.eval_shape(mlp.init, jax.random.key(0), x)
        assert set(variables['params']) == {'wi', 'wg', 'wo'}
        assert jax.eval_shape(mlp.apply, variables, x).shape == x.shape
    mlp = Mlp(16, act='silu', gated=True)  # SwiGLU against a hand-written reference
    p = init(mlp, x)['params']
    lin = lambda n, h: h @ p[n]['kernel'] + p[n]['bias']  # noqa: E731
    np.testing.assert_allclose(
        jax.jit(mlp.apply)({'params': p}, x),
        lin('wo', jax.nn.silu(lin('wg', x)) * lin('wi', x)),
        atol=1e-5,
        rtol=1e-5,
    )


def test_posemb_interpolation(ref):
    pe = jax.random.normal(jax.random.key(5), (16, 32))
    assert interpolate_posemb(pe, (4, 4), (4, 4)) is pe
    assert interpolate_posemb(pe, (4, 4), (8, 6)).shape == (48, 32)
    assert sincos2d_posemb(4, 4, 32).shape == (16, 32)
    params, _ = ref  # initialised at 32x32, run at 64x64
    assert params['params']['pos_embedding'].shape == (4, 4, 32)
    out, aux = jax.jit(ViT(**KW).apply)(params, jax.random.uniform(jax.random.key(6), (2, 64, 64, 3)))
    assert aux['patches'].shape == (2, 64, 32) and np.isfinite(out).all()


def test_clip_style_options():
    """patch_bias=False drops the patch bias; final_norm='pooled' norms the pooled class token only."""
    kw = dict(**TINY, class_token=True, pool='cls', pre_norm=True, patch_bias=False, posemb_resize='bicubic')
    model = ViT(**kw, final_norm='pooled')
    params = init(model)
    assert set(params['params']['embedding']) == {'kernel'}
    _, aux = jax.jit(model.apply)(params, X)
    _, aux_all = jax.jit(ViT(**kw).apply)(params, X)  # final_norm='all' on the same params
    assert aux['tokens'].shape == (2, 17, 32)
    np.testing.assert_array_equal(aux['patches'], aux['tokens'][:, 1:])
    norm = lambda y: LayerNorm(epsilon=1e-6).apply({'params': params['params']['encoder_norm']}, y)  # noqa: E731
    np.testing.assert_allclose(aux['pooled'], norm(aux['tokens'][:, 0]), atol=1e-5)
    np.testing.assert_allclose(aux_all['tokens'], norm(aux['tokens']), atol=1e-5)
    assert not np.allclose(aux['tokens'], aux_all['tokens'], atol=1e-2)
    aux64 = jax.eval_shape(model.apply, params, jnp.zeros((2, 64, 48, 3)))[1]  # bicubic posemb resize
    assert aux64['tokens'].shape == (2, 49, 32) and aux64['pooled'].shape == (2, 32)


def test_tiny_vit_trains():
    # Toy task: is the bright square in the left or the right half?
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 16)
    images = rng.uniform(0, 0.2, (16, 32, 32, 3)).astype(np.float32)
    for i, y in enumerate(labels):
        r, c = rng.integers(0, 24), rng.integers(0, 8) + 16 * y
        images[i, r : r + 8, c : c + 8] = 1.0
    model = ViT(**TINY, num_classes=2)
    params = init(model)['params']
    tx = optax.adam(1e-3)

    @jax.jit
    def step(params, opt_state):
        def loss_fn(p):
            logits, _ = model.apply({'params': p}, images, train=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = tx.init(params)
    losses = []
    for _ in range(30):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses


def test_remat_names_and_their_memory():
    """models/remat.py: 'none' is no remat; a typo names the choices; the compiled gradient of a
    scanned depth-4 ViT keeps less with 'dots' than without remat, and least with 'full' (unscanned,
    CPU XLA's buffer assignment does not shrink: BENCHMARKS.md section 17)."""
    from mmjax.models import remat

    assert remat.wrap(ViT, 'none', scan=False) is ViT
    with pytest.raises(
        ValueError, match="use 'none', 'full', 'dots', 'offload' or a jax.checkpoint_policies"
    ):
        remat.policy('dot')
    with pytest.raises(ValueError, match='needs arguments'):
        remat.policy('save_only_these_names')
    kw = dict(patch_size=8, width=64, depth=4, num_heads=2, num_classes=3, scan=True)
    x = jax.random.uniform(jax.random.key(1), (8, 64, 64, 3))  # activations outweigh the weights
    p4 = init(ViT(**kw), x)

    def temp(name):
        model = ViT(**kw, remat=name)
        f = jax.jit(jax.grad(lambda p: jnp.sum(model.apply(p, x)[0] ** 2)))
        return f.lower(p4).compile().memory_analysis().temp_size_in_bytes

    none, dots, full = temp(''), temp('dots'), temp('full')
    assert full < dots < 0.7 * none, (none, dots, full)
