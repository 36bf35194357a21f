"""KV-cache decoding: cache == recomputation, greedy / sampling / beam search, padding, stop tokens."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models.llm import LLM, init_cache
from mmjax.sampling.decode import beam_search, generate

MODEL = LLM(vocab_size=128, width=64, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=128, scan=True)
PROMPTS = jax.random.randint(jax.random.key(0), (3, 6), 3, 128)
N = 8


@pytest.fixture(scope='module')
def params():
    p = nn.unbox(jax.jit(MODEL.init)(jax.random.key(1), PROMPTS))['params']
    return jax.tree.map(lambda x: 3 * x, p)  # a peaked, far-from-uniform next-token distribution


@pytest.fixture(scope='module')
def forward(params):
    return jax.jit(lambda tokens: MODEL.apply({'params': params}, tokens)[0])


def greedy_by_recomputation(forward, prompts, n):
    """Greedy continuation from full forward passes (no cache) over a fixed-size causal buffer."""
    T = prompts.shape[1]
    seq = jnp.concatenate([prompts, jnp.zeros((prompts.shape[0], n), prompts.dtype)], axis=1)
    for t in range(n):
        seq = seq.at[:, T + t].set(jnp.argmax(forward(seq)[:, T + t - 1], -1).astype(seq.dtype))
    return np.asarray(seq[:, T:])


def log_prob(forward, prompts, ids):
    """Teacher-forced sum of log p(ids | prompt) per row."""
    logits = forward(jnp.concatenate([prompts, ids], axis=1))[:, prompts.shape[1] - 1 : -1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    return np.asarray(jnp.take_along_axis(logp, ids[..., None], -1)[..., 0].sum(-1))


def test_cached_steps_equal_full_recomputation(params, forward):
    seq = jax.random.randint(jax.random.key(5), (3, 14), 0, 128)
    full = forward(seq)
    step = jax.jit(lambda t, c: MODEL.apply({'params': params}, t, cache=c))
    logits, aux = step(seq[:, :6], init_cache(MODEL, 3, 14))
    np.testing.assert_allclose(logits, full[:, :6], atol=1e-4, rtol=1e-4)
    for i in range(6, 14):
        logits, aux = step(seq[:, i : i + 1], aux['cache'])
        np.testing.assert_allclose(logits[:, 0], full[:, i], atol=1e-4, rtol=1e-4)
    assert int(aux['cache']['index']) == 14 and bool(aux['cache']['valid'].all())


def test_greedy_equals_recomputation_and_embeddings_prompt(params, forward):
    ids, lengths = generate(MODEL, params, PROMPTS, max_new_tokens=N)
    ref = greedy_by_recomputation(forward, PROMPTS, N)
    np.testing.assert_array_equal(ids, ref)
    np.testing.assert_array_equal(lengths, [N] * 3)
    assert len({tuple(r) for r in ref}) == 3
    emb = MODEL.apply({'params': params}, PROMPTS, method='embed')
    np.testing.assert_array_equal(generate(MODEL, params, embeddings=emb, max_new_tokens=N)[0], ref)


@pytest.mark.parametrize('side', ['left', 'right'])
def test_prompts_of_different_lengths(params, forward, side):
    """A padded batch decodes each row exactly as that prompt alone."""
    lengths = [6, 3, 5]
    mask = np.zeros((3, 6), bool)
    for row, n in enumerate(lengths):
        (mask[row, 6 - n :] if side == 'left' else mask[row, :n]).fill(True)
    padded = jnp.where(mask, PROMPTS, 0)
    ids, _ = generate(MODEL, params, padded, prompt_mask=mask, max_new_tokens=N)
    for row, n in enumerate(lengths):
        alone = PROMPTS[row : row + 1, 6 - n :] if side == 'left' else PROMPTS[row : row + 1, :n]
        np.testing.assert_array_equal(ids[row], greedy_by_recomputation(forward, alone, N)[0])


def test_stop_tokens_stop_rows_independently(params):
    free, _ = generate(MODEL, params, PROMPTS, max_new_tokens=N)
    free = np.asarray(free)
    stop = (int(free[0, 2]), int(free[1, 4]))  # row 0 stops at step 2, row 1 at step 4 (or earlier)
    ids, lengths = generate(MODEL, params, PROMPTS, max_new_tokens=N, stop_tokens=stop, pad_id=127)
    ids = np.asarray(ids)
    for row in range(3):
        hits = [i for i in range(N) if free[row, i] in stop]
        n = hits[0] + 1 if hits else N
        assert lengths[row] == n
        np.testing.assert_array_equal(ids[row, :n], free[row, :n])
        assert (ids[row, n:] == 127).all()
    assert lengths[0] <= 3 and lengths[1] <= 5


def test_allowed_tokens_restrict_every_choice(params):
    allowed = jnp.zeros(128, bool).at[40:48].set(True)
    for method in ("greedy", "sample"):
        ids, _ = generate(
            MODEL, params, PROMPTS, max_new_tokens=N, method=method, rng=jax.random.key(0), allowed=allowed
        )
        assert ((np.asarray(ids) >= 40) & (np.asarray(ids) < 48)).all()
    free, _ = generate(MODEL, params, PROMPTS, max_new_tokens=N)
    assert not ((np.asarray(free) >= 40) & (np.asarray(free) < 48)).all()  # the restriction did something


def test_sampling(params, forward):
    greedy, _ = generate(MODEL, params, PROMPTS, max_new_tokens=N)
    key = jax.random.key(7)
    top1, _ = generate(MODEL, params, PROMPTS, max_new_tokens=N, method='sample', top_k=1, rng=key)
    np.testing.assert_array_equal(top1, greedy)
    nucleus, _ = generate(MODEL, params, PROMPTS, max_new_tokens=N, method='sample', top_p=1e-6, rng=key)
    np.testing.assert_array_equal(nucleus, greedy)
    a, _ = generate(MODEL, params, PROMPTS, max_new_tokens=N, method='sample', temperature=2.0, rng=key)
    b, _ = generate(MODEL, params, PROMPTS, max_new_tokens=N, method='sample', temperature=2.0, rng=key)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, greedy)
    # first-token frequencies over many rows follow softmax(logits / T), restricted to the top k
    rows = jnp.repeat(PROMPTS[:1], 1000, axis=0)
    first, _ = generate(
        MODEL, params, rows, max_new_tokens=1, method='sample', temperature=1.5, top_k=5, rng=key
    )
    logits = np.asarray(forward(PROMPTS[:1])[0, -1]) / 1.5
    top = np.argsort(logits)[::-1][:5]
    probs = np.exp(logits[top] - logits[top].max())
    probs /= probs.sum()
    counts = np.array([(np.asarray(first[:, 0]) == t).sum() for t in top]) / 1000
    assert counts.sum() == 1.0  # nothing outside the top 5
    np.testing.assert_allclose(counts, probs, atol=0.05)
    with pytest.raises(ValueError, match='rng'):
        generate(MODEL, params, PROMPTS, method='sample')


def test_beam_search(params, forward):
    greedy, _ = generate(MODEL, params, PROMPTS, max_new_tokens=N)
    ids, lengths, scores = beam_search(MODEL, params, PROMPTS, max_new_tokens=N, beam_size=1)
    np.testing.assert_array_equal(ids, greedy)
    np.testing.assert_allclose(scores, log_prob(forward, PROMPTS, greedy), atol=1e-4)
    ids, lengths, scores = beam_search(MODEL, params, PROMPTS, max_new_tokens=N, beam_size=4)
    np.testing.assert_allclose(
        scores, log_prob(forward, PROMPTS, ids), atol=1e-4
    )  # scores are true log-probs
    emb = MODEL.apply({'params': params}, PROMPTS, method='embed')
    np.testing.assert_array_equal(
        beam_search(MODEL, params, embeddings=emb, max_new_tokens=N, beam_size=4)[0], ids
    )
    greedy_lp = log_prob(forward, PROMPTS, greedy)
    assert (scores >= greedy_lp - 1e-5).all() and (scores > greedy_lp + 1e-3).any()
    # stop tokens: finished beams are padded, lengths count the stop token
    stop = int(ids[0, 1])
    ids, lengths, _ = beam_search(
        MODEL, params, PROMPTS, max_new_tokens=N, beam_size=4, stop_tokens=(stop,), pad_id=127
    )
    for row in range(3):
        n = int(lengths[row])
        assert (np.asarray(ids[row, n:]) == 127).all()
        assert n == N or int(ids[row, n - 1]) == stop
    assert int(lengths[0]) <= 2
    # a length penalty (score / length) prefers a longer beam over that short finished one
    _, normalised, _ = beam_search(
        MODEL,
        params,
        PROMPTS,
        max_new_tokens=N,
        beam_size=4,
        stop_tokens=(stop,),
        pad_id=127,
        length_penalty=1.0,
    )
    assert int(normalised[0]) > int(lengths[0])
