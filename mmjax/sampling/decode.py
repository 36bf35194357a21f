"""Autoregressive decoding with a KV cache: greedy, sampling (temperature / top-k / top-p), beam search.

The cache is functional (`mmjax.models.llm.init_cache`): one array pair per layer stack,
preallocated to prompt length + max_new_tokens, threaded through a jitted `jax.lax.while_loop`
that stops early once every row is done. The prompt is prefilled in one call, then each step
feeds one token per row.

Prompts: `tokens` [B, T] or `embeddings` [B, T, D] (e.g. text with image embeddings spliced
in), with `prompt_mask` [B, T] (False = padding; left, right or any padding works: RoPE positions
count only real tokens, so a padded row decodes exactly as it would alone). `params` is the
'params' collection. Outputs are [B, max_new_tokens] ids: a row's stop token is kept, then
`pad_id` fills the rest; lengths count tokens up to and including the stop token.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mmjax.models.llm import LLM, init_cache


def _prefill(model: LLM, params, tokens, embeddings, mask, max_new_tokens: int):
    """Runs the prompt through the model: (logits of each row's last real token [B, V], cache, prompt lengths)."""
    B, T = mask.shape
    cache = init_cache(model, B, T + max_new_tokens)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    logits, aux = model.apply(
        {'params': params},
        tokens,
        embeddings=embeddings,
        positions=positions,
        attention_mask=mask,
        cache=cache,
    )
    last = T - 1 - jnp.argmax(mask[:, ::-1], axis=1)
    return logits[jnp.arange(B), last], aux['cache'], mask.sum(axis=1).astype(jnp.int32)


def _step(model: LLM, params, token, position, cache):
    """Feeds one token per row at RoPE `position` [B]: (next-token logits [B, V], cache)."""
    logits, aux = model.apply({'params': params}, token[:, None], positions=position[:, None], cache=cache)
    return logits[:, 0], aux['cache']


def _prompt(tokens, embeddings, prompt_mask):
    assert (tokens is None) != (embeddings is None), 'pass exactly one of tokens and embeddings'
    shape = (tokens if embeddings is None else embeddings).shape[:2]
    return jnp.ones(shape, bool) if prompt_mask is None else jnp.asarray(prompt_mask, bool)


def select(
    logits: jax.Array, rng: jax.Array, method: str, temperature, top_k: int, top_p: float
) -> jax.Array:
    """Next tokens [B] from logits [B, V]: 'greedy' (argmax) or 'sample' (temperature, then top-k,
    then top-p nucleus filtering, as HF's sampling order)."""
    if method == 'greedy':
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    assert method == 'sample', f"method is 'greedy' or 'sample', not {method!r}"
    logits = logits.astype(jnp.float32) / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
        cutoff = jnp.min(jnp.where(before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(
    jax.jit, static_argnames=('model', 'max_new_tokens', 'method', 'top_k', 'top_p', 'stop_tokens', 'pad_id')
)
def _generate(
    model,
    params,
    tokens,
    embeddings,
    mask,
    rng,
    temperature,
    *,
    max_new_tokens,
    method,
    top_k,
    top_p,
    stop_tokens,
    pad_id,
    allowed=None,
):
    logits, cache, lengths = _prefill(model, params, tokens, embeddings, mask, max_new_tokens)
    B = mask.shape[0]
    stops = jnp.asarray(stop_tokens or (-1,), jnp.int32)

    def choose(i, logits, rng, ids, done, n):  # token i of each row; done rows get pad_id
        rng, key = jax.random.split(rng)
        if allowed is not None:
            logits = jnp.where(allowed, logits, -jnp.inf)
        token = jnp.where(done, pad_id, select(logits, key, method, temperature, top_k, top_p))
        return token, rng, ids.at[:, i].set(token), done | jnp.isin(token, stops), n + ~done

    def body(state):  # feeds token i - 1, chooses token i: no forward pass after the last token
        i, token, rng, ids, done, n, cache = state
        logits, cache = _step(model, params, token, lengths + i - 1, cache)
        return i + 1, *choose(i, logits, rng, ids, done, n), cache

    ids = jnp.full((B, max_new_tokens), pad_id, jnp.int32)
    state = (jnp.int32(1), *choose(0, logits, rng, ids, jnp.zeros(B, bool), jnp.zeros(B, jnp.int32)), cache)
    state = jax.lax.while_loop(lambda s: (s[0] < max_new_tokens) & ~jnp.all(s[4]), body, state)
    _, _, _, ids, _, n, _ = state
    return ids, n


def generate(
    model: LLM,
    params,
    tokens: jax.Array | None = None,
    *,
    embeddings: jax.Array | None = None,
    prompt_mask: jax.Array | None = None,
    max_new_tokens: int = 32,
    method: str = 'greedy',
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_tokens: tuple[int, ...] = (),
    pad_id: int = 0,
    rng: jax.Array | None = None,
    allowed: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(ids [B, max_new_tokens] int32, lengths [B]) continuing each prompt; jitted per static setting.

    method='greedy' | 'sample' (temperature, top_k=0: off, top_p=1: off; needs `rng`).
    allowed: bool [V], the only tokens that may be chosen (e.g. an image's code tokens)."""
    mask = _prompt(tokens, embeddings, prompt_mask)
    if method == 'sample' and rng is None:
        raise ValueError("method='sample' needs rng")
    return _generate(
        model,
        params,
        tokens,
        embeddings,
        mask,
        jax.random.key(0) if rng is None else rng,
        jnp.float32(temperature),
        max_new_tokens=max_new_tokens,
        method=method,
        top_k=top_k,
        top_p=float(top_p),
        stop_tokens=tuple(int(t) for t in stop_tokens),
        pad_id=pad_id,
        allowed=allowed,
    )


@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens', 'beam_size', 'stop_tokens', 'pad_id'))
def _beam_search(
    model, params, tokens, embeddings, mask, length_penalty, *, max_new_tokens, beam_size, stop_tokens, pad_id
):
    K, N = beam_size, max_new_tokens
    logits, cache, prompt_lengths = _prefill(model, params, tokens, embeddings, mask, N)
    B, V = logits.shape
    stops = jnp.asarray(stop_tokens or (-1,), jnp.int32)
    beams = lambda x, axis=0: jnp.repeat(x, K, axis=axis)  # noqa: E731  [B, ...] -> [B * K, ...]
    cache = {
        'k': beams(cache['k'], 1),
        'v': beams(cache['v'], 1),
        'valid': beams(cache['valid']),
        'index': cache['index'],
    }
    positions = beams(prompt_lengths)
    pad_only = jnp.where(jnp.arange(V) == pad_id, 0.0, -jnp.inf)  # a finished beam extends with pad for free

    def choose(i, logits, seqs, scores, done, n):  # the K best extensions of each row's beams
        logp = jax.nn.log_softmax(logits.reshape(B, K, V), axis=-1)
        logp = jnp.where(done[..., None], pad_only, logp)
        scores, flat = jax.lax.top_k((scores[..., None] + logp).reshape(B, K * V), K)
        parent, token = flat // V, (flat % V).astype(jnp.int32)
        seqs = jnp.take_along_axis(seqs, parent[..., None], axis=1).at[:, :, i].set(token)
        was_done = jnp.take_along_axis(done, parent, axis=1)
        n = jnp.take_along_axis(n, parent, axis=1) + ~was_done
        return parent, token, seqs, scores, was_done | jnp.isin(token, stops), n

    def body(state):  # moves each beam's cache to its parent's, feeds token i - 1, chooses token i
        i, parent, token, seqs, scores, done, n, cache = state
        rows = (jnp.arange(B)[:, None] * K + parent).reshape(-1)
        cache = {**cache, 'k': cache['k'][:, rows], 'v': cache['v'][:, rows], 'valid': cache['valid'][rows]}
        logits, cache = _step(model, params, token.reshape(-1), positions + i - 1, cache)
        return i + 1, *choose(i, logits, seqs, scores, done, n), cache

    start = jnp.where(jnp.arange(K) == 0, 0.0, -jnp.inf)[None].repeat(B, 0)  # one live beam per row
    seqs, zeros = jnp.full((B, K, N), pad_id, jnp.int32), jnp.zeros((B, K), jnp.int32)
    state = (jnp.int32(1), *choose(0, beams(logits), seqs, start, zeros.astype(bool), zeros), cache)
    state = jax.lax.while_loop(lambda s: (s[0] < N) & ~jnp.all(s[5]), body, state)
    _, _, _, seqs, scores, _, n, _ = state
    best = jnp.argmax(scores / jnp.maximum(n, 1).astype(jnp.float32) ** length_penalty, axis=1)
    rows = jnp.arange(B)
    return seqs[rows, best], n[rows, best], scores[rows, best]


def beam_search(
    model: LLM,
    params,
    tokens: jax.Array | None = None,
    *,
    embeddings: jax.Array | None = None,
    prompt_mask: jax.Array | None = None,
    max_new_tokens: int = 32,
    beam_size: int = 4,
    length_penalty: float = 0.0,
    stop_tokens: tuple[int, ...] = (),
    pad_id: int = 0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Batched beam search: (ids [B, max_new_tokens], lengths [B], log-prob [B]) of each row's best beam.

    Beams keep their summed log-probs; a finished beam (stop token) stays in the beam with its
    score frozen. The winner maximises log-prob / length ** length_penalty (0: plain log-prob)."""
    mask = _prompt(tokens, embeddings, prompt_mask)
    return _beam_search(
        model,
        params,
        tokens,
        embeddings,
        mask,
        jnp.float32(length_penalty),
        max_new_tokens=max_new_tokens,
        beam_size=beam_size,
        stop_tokens=tuple(int(t) for t in stop_tokens),
        pad_id=pad_id,
    )
