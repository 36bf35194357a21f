"""Mixture-of-experts FFN: routing vs a per-token reference, capacity drops, aux losses, gradients;
the MoE LLM: scan/remat, padding, learning, KV-cache decoding, expert-parallel sharding."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from mmjax.config import DEFAULT_RULES
from mmjax.models.llm import LLM, init_cache, stack_layers
from mmjax.models.moe import MoeMlp
from mmjax.sampling.decode import generate

TOL = dict(atol=1e-5, rtol=1e-5)
X = jax.random.normal(jax.random.key(0), (2, 8, 16))


def init(module, x=X):
    return nn.unbox(jax.jit(module.init)(jax.random.key(1), x))['params']


@functools.cache
def _apply(module):
    return jax.jit(lambda p, args, kw: module.apply({'params': p}, *args, **kw))


def run(params, module, *args, **kw):
    return _apply(module)(params, args, kw)


def naive(params, x, top_k=2):
    """Per token: top-k experts by router probability, gates renormalised, gated sum of SwiGLU experts."""
    p, x = jax.tree.map(lambda a: np.asarray(a, np.float64), (params, x))
    silu = lambda a: a / (1 + np.exp(-a))  # noqa: E731
    out = np.zeros(x.shape)
    for b, t in np.ndindex(x.shape[:2]):
        logits = x[b, t] @ p['router']['kernel']
        probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        chosen = np.argsort(-probs, kind='stable')[:top_k]
        gates = probs[chosen] / probs[chosen].sum()
        for g, e in zip(gates, chosen):
            out[b, t] += g * ((silu(x[b, t] @ p['wg'][e]) * (x[b, t] @ p['wi'][e])) @ p['wo'][e])
    return out


@pytest.mark.parametrize('group_size', [None, 4, 3])  # 3: rows padded to whole groups
def test_routing_equals_naive_reference(group_size):
    moe = MoeMlp(num_experts=4, mlp_dim=32, capacity_factor=2.0, group_size=group_size)  # C = S: dropless
    params = init(moe)
    params['router']['kernel'] *= 4  # decisive routing
    y, aux = run(params, moe, X)
    np.testing.assert_allclose(y, naive(params, X), **TOL)
    assert float(aux['drop_fraction']) == 0.0
    np.testing.assert_allclose(aux['expert_load'].sum(), 1.0, rtol=1e-6)
    # padding: zero output, and neither routed nor counted (the same losses as the real tokens alone)
    mask = jnp.arange(8)[None].repeat(2, 0) < jnp.array([[5], [8]])
    y_pad, aux_pad = run(params, moe, X, mask)
    np.testing.assert_allclose(y_pad, np.where(mask[..., None], y, 0.0), **TOL)
    real = jnp.concatenate([X[0, :5], X[1]])[None]
    _, aux_real = run(params, moe, real)
    for k in aux:
        np.testing.assert_allclose(aux_pad[k], aux_real[k], **TOL)


def collapsed():
    """All tokens prefer expert 0, then expert 1 (positive inputs, router columns 0 > 1 > others)."""
    moe = MoeMlp(num_experts=4, mlp_dim=32, capacity_factor=1.0)  # S = 8: capacity 8 * 2 / 4 = 4
    params = init(moe)
    params['router']['kernel'] = jnp.zeros((16, 4)).at[:, 0].set(2.0).at[:, 1].set(1.0)
    return moe, params, jnp.abs(X) + 0.1


def test_overflow_is_dropped_and_counted():
    moe, params, x = collapsed()
    y, aux = run(params, moe, x)
    np.testing.assert_allclose(y[:, :4], naive(params, x[:, :4]), **TOL)  # first 4 tokens fit
    np.testing.assert_array_equal(y[:, 4:], 0.0)  # the rest overflow both experts: zero FFN output
    np.testing.assert_allclose(aux['drop_fraction'], 0.5)
    np.testing.assert_allclose(aux['expert_load'], [0.5, 0.5, 0, 0])
    # a one-token step (decoding) never drops
    _, aux = run(params, moe, x[:, :1])
    assert float(aux['drop_fraction']) == 0.0


def test_load_balance_and_z_loss():
    moe = MoeMlp(num_experts=4, mlp_dim=32, top_k=2)
    params = init(moe, X[..., :4])
    params['router']['kernel'] = 4 * jnp.eye(4)
    e = jnp.arange(8) % 4  # token s picks experts s % 4 and (s + 1) % 4: uniform loads and probs
    x = (3 * jax.nn.one_hot(e, 4) + jax.nn.one_hot((e + 1) % 4, 4))[None]
    _, aux = run(params, moe, x)
    np.testing.assert_allclose(aux['expert_load'], [0.25] * 4, rtol=1e-6)
    np.testing.assert_allclose(aux['load_balance_loss'], 1.0, rtol=1e-5)
    logits = x @ params['router']['kernel']
    np.testing.assert_allclose(aux['z_loss'], jnp.mean(jax.nn.logsumexp(logits, -1) ** 2), rtol=1e-5)
    moe, params, x = collapsed()
    _, aux = run(params, moe, x)
    assert float(aux['load_balance_loss']) > 1.8  # -> E / 2 = 2 as the router saturates
    logits = x @ params['router']['kernel']
    np.testing.assert_allclose(aux['z_loss'], jnp.mean(jax.nn.logsumexp(logits, -1) ** 2), rtol=1e-5)


def test_gradients_reach_router_and_experts():
    moe = MoeMlp(num_experts=4, mlp_dim=32)
    params = init(moe)

    def loss(p, aux_only):
        y, aux = run(p, moe, X)
        return aux['load_balance_loss'] + aux['z_loss'] if aux_only else jnp.sum(y**2)

    grads = jax.grad(loss)(params, False)  # the router also learns through the gates
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    assert float(jnp.abs(jax.grad(loss)(params, True)['router']['kernel']).max()) > 0


# ---- the MoE LLM ------------------------------------------------------------------------------
DENSE = dict(vocab_size=128, width=64, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=64)
DROPLESS = dict(num_experts=4, capacity_factor=2.0)
TOKENS = jax.random.randint(jax.random.key(2), (2, 12), 0, 128)


@pytest.fixture(scope='module')
def params():
    p = init(LLM(**DENSE, moe=DROPLESS), TOKENS)
    return jax.tree.map(lambda x: 3 * x, p)  # peaked outputs, decisive routing


def test_llm_aux_layout_and_every():
    model = LLM(**DENSE, moe=dict(num_experts=4, every=2))
    boxed = jax.eval_shape(model.init, jax.random.key(0), TOKENS)['params']['decoder']
    assert 'mlp' in boxed['block_0'] and 'moe' in boxed['block_1']
    assert boxed['block_1']['moe']['wi'].names == ('expert', 'embed', 'mlp')
    assert boxed['block_1']['moe']['wo'].names == ('expert', 'mlp', 'embed')
    p = nn.unbox(jax.jit(model.init)(jax.random.key(0), TOKENS))['params']
    _, aux = run(p, model, tokens=TOKENS)
    assert aux['moe_loss'].shape == () and aux['moe_loss'].dtype == jnp.float32
    assert aux['moe_metrics']['expert_load'].shape == (1, 4)  # one MoE layer
    m = aux['moe_metrics']
    np.testing.assert_allclose(
        aux['moe_loss'], 0.01 * m['load_balance_loss'] + 0.001 * m['z_loss'], rtol=1e-6
    )
    with pytest.raises(ValueError, match='scan=True'):
        LLM(**DENSE, moe=dict(every=2), scan=True)
    with pytest.raises(ValueError, match='unknown keys'):
        LLM(**DENSE, moe=dict(experts=4))


def test_scan_remat_match_unscanned(params):
    ref, aux = run(params, LLM(**DENSE, moe=DROPLESS), tokens=TOKENS)
    stacked = stack_layers(params, DENSE['depth'])
    for model in (
        LLM(**DENSE, moe=DROPLESS, scan=True),
        LLM(**DENSE, moe=DROPLESS, scan=True, remat='nothing_saveable'),
    ):
        out, aux_s = run(stacked, model, tokens=TOKENS)
        np.testing.assert_allclose(out, ref, **TOL)
        for a, b in zip(jax.tree.leaves(aux_s['moe_metrics']), jax.tree.leaves(aux['moe_metrics'])):
            np.testing.assert_allclose(a, b, **TOL)


def test_padding_and_packing_are_not_routed(params):
    model = LLM(**DENSE, moe=DROPLESS)
    _, ref = run(params, model, tokens=TOKENS[:, :8])
    padded = TOKENS.at[:, 8:].set(0)  # right padding: the real tokens' states are unchanged (causal)
    mask = jnp.arange(12)[None].repeat(2, 0) < 8
    _, aux = run(params, model, tokens=padded, attention_mask=mask)
    np.testing.assert_allclose(aux['moe_loss'], ref['moe_loss'], **TOL)
    segments = jnp.where(mask, 1, 0)  # packed rows: segment 0 is padding
    _, aux = run(params, model, tokens=padded, segment_ids=segments)
    np.testing.assert_allclose(aux['moe_loss'], ref['moe_loss'], **TOL)


def test_moe_llm_learns():
    model = LLM(**DENSE, moe=dict(num_experts=4))
    seq = (jnp.arange(16)[None] * 3 + jnp.arange(8)[:, None] * 5) % 128  # arithmetic progressions
    p = init(model, seq)
    tx = optax.adam(3e-3)

    def loss_fn(p):
        logits, aux = model.apply({'params': p}, seq[:, :-1])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, seq[:, 1:]).mean()
        return ce + aux['moe_loss']

    @jax.jit
    def step(p, opt):
        loss, g = jax.value_and_grad(loss_fn)(p)
        updates, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, updates), opt, loss

    opt, losses = tx.init(p), []
    for _ in range(40):
        p, opt, loss = step(p, opt)
        losses.append(float(loss))
    assert losses[-1] < 0.3 * losses[0], losses


def test_kv_cache_decoding_equals_recomputation(params):
    model = LLM(**DENSE, moe=DROPLESS, scan=True)
    stacked = stack_layers(params, DENSE['depth'])
    forward = jax.jit(lambda t: model.apply({'params': stacked}, t)[0])
    step = jax.jit(lambda t, c: model.apply({'params': stacked}, t, cache=c))
    seq = jax.random.randint(jax.random.key(5), (2, 12), 0, 128)
    full = forward(seq)
    logits, aux = step(seq[:, :6], init_cache(model, 2, 12))
    np.testing.assert_allclose(logits, full[:, :6], atol=1e-4, rtol=1e-4)
    for i in range(6, 12):
        logits, aux = step(seq[:, i : i + 1], aux['cache'])
        np.testing.assert_allclose(logits[:, 0], full[:, i], atol=1e-4, rtol=1e-4)
    prompts, n = seq[:, :5], 6
    ids, _ = generate(model, stacked, prompts, max_new_tokens=n)
    buf = jnp.concatenate([prompts, jnp.zeros((2, n), prompts.dtype)], axis=1)
    for t in range(n):
        buf = buf.at[:, 5 + t].set(jnp.argmax(forward(buf)[:, 4 + t], -1).astype(buf.dtype))
    np.testing.assert_array_equal(ids, buf[:, 5:])


def test_expert_parallel_matches_one_device():
    """8 CPU devices, mesh data 2 x expert 4: experts are sharded, and the output is the 1-device one."""
    model = LLM(**DENSE, moe=dict(num_experts=8))
    tokens = jax.random.randint(jax.random.key(3), (8, 12), 0, 128)
    boxed = jax.eval_shape(model.init, jax.random.key(0), tokens)
    mesh = jax.make_mesh(
        (2, 1, 4, 1), ('data', 'fsdp', 'expert', 'tensor'), axis_types=(jax.sharding.AxisType.Auto,) * 4
    )
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, DEFAULT_RULES)
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        sharded = jax.jit(lambda k: nn.unbox(model.init(k, tokens)), out_shardings=shardings)(
            jax.random.key(0)
        )
        fwd = jax.jit(lambda p, t: model.apply(p, t))
        out, aux = fwd(sharded, tokens)
        hlo = fwd.lower(sharded, tokens).compile().as_text()
    wi = sharded['params']['decoder']['block_0']['moe']['wi']
    assert wi.sharding.spec == P('expert', 'fsdp', 'tensor')
    assert {s.data.shape for s in wi.addressable_shards} == {(2, 64, 64)}  # 8 experts / 4
    assert 'all-to-all(' in hlo and 'all-gather(' not in hlo  # tokens travel to their experts only
    local = jax.device_get(sharded)
    ref, ref_aux = run(local['params'], model, tokens)
    np.testing.assert_allclose(out, ref, **TOL)
    np.testing.assert_allclose(aux['moe_loss'], ref_aux['moe_loss'], **TOL)
