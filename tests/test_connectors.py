"""MM1 connectors: token counts, logical axes, bf16, adaptive pooling vs torch, learning on shapes, config errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from mmjax.config import DEFAULT_RULES
from mmjax.data.shapes import ShapesSource
from mmjax.models import connectors
from mmjax.models.layers import dense
from mmjax.models.vit import ViT
from mmjax.recipes.vit_shapes import NUM_CLASSES, preprocess

OPTIONS = {'avg_pool': {}, 'attn_pool': {'num_heads': 4}, 'c_abstractor': {'hidden_dim': 24}, 'mlp': {}}
PARAM_NAMES = {'embed', 'mlp', 'heads', 'kv', None}
MESH = jax.make_mesh((2, 2, 2), ('data', 'fsdp', 'tensor'), axis_types=(jax.sharding.AxisType.Auto,) * 3)


def patches(g, batch=2, width=32):
    return jax.random.normal(jax.random.key(g), (batch, g * g, width))


def make(kind, num_tokens, **kw):
    return connectors.build(kind, num_tokens=num_tokens, out_dim=48, **OPTIONS[kind], **kw)


def key():
    """Init key: the 'rbg' PRNG compiles far faster than threefry on CPU (this file is compile-bound)."""
    return jax.random.key(0, impl='rbg')


def shapes_of(model, x):
    """Abstract init (no compile): config errors that need the input's grid surface here."""
    return jax.eval_shape(model.init, key(), x)


@pytest.mark.parametrize('kind', list(OPTIONS))
def test_token_counts_and_axes(kind):
    cases = [(8, 4), (8, 16)] + ([(6, 4), (8, 9)] if kind == 'c_abstractor' else [])  # 9: 8 % 3 != 0
    for g, num_tokens in cases:
        expect = g * g if kind == 'mlp' else num_tokens
        x = patches(g)
        boxed = shapes_of(make(kind, expect), x)
        for leaf in jax.tree.leaves(boxed, is_leaf=lambda a: isinstance(a, nn.Partitioned)):
            assert isinstance(leaf, nn.Partitioned) and len(leaf.names) == leaf.value.ndim
            assert set(leaf.names) <= PARAM_NAMES, leaf.names
        # Every spec resolves on a data x fsdp x tensor mesh (no logical name twice in one param).
        nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), MESH, DEFAULT_RULES)
        for dtype in (jnp.float32, jnp.bfloat16):
            out = jax.eval_shape(make(kind, expect, dtype=dtype).apply, boxed, x)
            assert out.shape == (2, expect, 48) and out.dtype == dtype


@pytest.mark.parametrize('kind', list(OPTIONS))
def test_bf16_close_to_fp32(kind):
    """bf16 compute on fp32 params stays within bf16 rounding of the fp32 output."""
    kw = {'depth': 1} if kind == 'c_abstractor' else {}
    num_tokens = 64 if kind == 'mlp' else 4

    @jax.jit
    def run(x):
        params = make(kind, num_tokens, **kw).init(key(), x)
        out16 = make(kind, num_tokens, dtype=jnp.bfloat16, **kw).apply(params, x)
        return make(kind, num_tokens, **kw).apply(params, x), out16

    out32, out16 = run(patches(8))
    assert out16.dtype == jnp.bfloat16 and bool(jnp.isfinite(out16).all())
    err = jnp.linalg.norm(out16.astype(jnp.float32) - out32) / jnp.linalg.norm(out32)
    assert err < 0.05, float(err)


def test_c_abstractor_posemb_follows_grid():
    """Params made on an 8x8 grid apply to a 6x6 grid (posemb resized); without posemb none is stored."""
    model = make('c_abstractor', 4)
    params = shapes_of(model, patches(8))
    assert params['params']['pos_embedding'].value.shape == (8, 8, 32)
    assert jax.eval_shape(model.apply, params, patches(6)).shape == (2, 4, 48)
    assert 'pos_embedding' not in shapes_of(make('c_abstractor', 4, pos_emb=False), patches(8))['params']


@pytest.mark.parametrize(
    'hw,out_hw', [((7, 7), (3, 3)), ((6, 6), (4, 4)), ((5, 9), (2, 4)), ((8, 8), (2, 2))]
)
def test_adaptive_avg_pool_matches_torch(hw, out_hw):
    x = np.random.default_rng(0).normal(size=(2, *hw, 5)).astype(np.float32)
    ours = np.asarray(connectors.adaptive_avg_pool(jnp.asarray(x), out_hw))
    ref = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2), out_hw)
    np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-6)


def test_avg_pool_is_block_mean_then_linear():
    """Token (i, j) (row-major) is the mean of patch block (i, j), then the projection."""
    x = patches(8)
    model = connectors.build('avg_pool', num_tokens=4, out_dim=8)
    params = nn.unbox(model.init(key(), x))['params']['proj']
    grid = np.asarray(x).reshape(2, 2, 4, 2, 4, 32)  # b, i, n1, j, n2, d
    expect = grid.mean(axis=(2, 4)).reshape(2, 4, 32) @ params['kernel'] + params['bias']
    np.testing.assert_allclose(model.apply({'params': {'proj': params}}, x), expect, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope='module')
def shapes_data():
    """320 rendered train scenes: images in [-1, 1] [320, 32, 32, 3] and multi-hot (colour, shape) labels."""
    source = ShapesSource(split='train', view='image')
    records = [preprocess(source[i]) for i in range(320)]
    return {k: np.stack([r[k] for r in records]) for k in ('image', 'labels')}


class Probe(nn.Module):
    """Tiny ViT (8x8 patch grid) -> each connector -> mean over its tokens -> its own multi-label head.

    One shared ViT keeps this file compile-light; each head sees only its connector's tokens, so its
    loss falls below the image-blind level only if that connector carries the image through."""

    @nn.compact
    def __call__(self, images):
        x, _ = ViT(patch_size=4, width=32, depth=1, num_heads=2, mlp_dim=64, pool='none', name='vit')(images)
        logits = {}
        for kind, options in OPTIONS.items():
            extra = {'depth': 1} if kind == 'c_abstractor' else {}
            tokens = connectors.build(
                kind, num_tokens=None if kind == 'mlp' else 4, out_dim=32, **options, **extra, name=kind
            )(x)
            logits[kind] = dense(NUM_CLASSES, ('embed', 'vocab'), name=f'head_{kind}')(tokens.mean(axis=1))
        return logits


@pytest.fixture(scope='module')
def losses(shapes_data):
    """Per-connector training losses: adam, 100 steps of batch 32 cycling over the scenes, one compiled scan."""
    model, tx = Probe(), optax.adam(3e-3)

    @jax.jit
    def train(images, labels):
        params = model.init(key(), images[:1])

        def loss_fn(p, x, y):
            per_kind = {
                k: optax.sigmoid_binary_cross_entropy(v, y).mean() for k, v in model.apply(p, x).items()
            }
            return sum(per_kind.values()), per_kind

        def step(carry, i):
            params, opt_state = carry
            start = (i * 32) % images.shape[0]
            x, y = (jax.lax.dynamic_slice_in_dim(a, start, 32) for a in (images, labels))
            (_, per_kind), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), per_kind

        return jax.lax.scan(step, (params, tx.init(params)), jnp.arange(100))[1]

    return jax.tree.map(np.asarray, train(shapes_data['image'], shapes_data['labels']))


@pytest.mark.parametrize('kind', list(OPTIONS))
def test_learns_shapes(kind, losses, shapes_data):
    first, last = np.mean(losses[kind][:10]), np.mean(losses[kind][-10:])
    # The best image-blind predictor (label frequencies) scores the labels' mean binary entropy.
    p = np.clip(shapes_data['labels'].mean(0), 1e-6, 1 - 1e-6)
    blind = float(np.mean(-(p * np.log(p) + (1 - p) * np.log(1 - p))))
    print(kind, f'first10={first:.3f} last10={last:.3f} blind={blind:.3f}')
    assert last < 0.8 * first and last < 0.85 * blind, (first, last, blind)


def test_bad_configs():
    with pytest.raises(ValueError, match="unknown connector 'q_former'.*avg_pool"):
        connectors.build('q_former', num_tokens=4, out_dim=8)
    with pytest.raises(ValueError, match='no option.*num_querys'):
        connectors.build('attn_pool', num_querys=4, out_dim=8)
    for kind in ('avg_pool', 'c_abstractor'):
        for bad in (5, 0, -4):
            with pytest.raises(ValueError, match='num_tokens must be a positive perfect square'):
                connectors.build(kind, num_tokens=bad, out_dim=8)
    with pytest.raises(ValueError, match='num_tokens > 0'):
        connectors.build('attn_pool', num_tokens=0, out_dim=8)
    with pytest.raises(ValueError, match='depth must be >= 1'):
        connectors.build('c_abstractor', num_tokens=4, out_dim=8, depth=0)
    with pytest.raises(ValueError, match=r'sqrt\(num_tokens\)=3 to divide the 8x8'):
        shapes_of(make('avg_pool', 9), patches(8))
    with pytest.raises(ValueError, match='N must be a positive perfect square'):
        shapes_of(make('c_abstractor', 4), jnp.zeros((2, 10, 32)))
    with pytest.raises(ValueError, match='cannot make num_tokens=100 from 8x8'):
        shapes_of(make('c_abstractor', 100), patches(8))
    with pytest.raises(ValueError, match='num_heads=5 must divide the vision width 32'):
        shapes_of(connectors.build('attn_pool', num_tokens=4, out_dim=8, num_heads=5), patches(8))
    with pytest.raises(ValueError, match='mlp keeps one token per patch'):
        shapes_of(make('mlp', 16), patches(8))
