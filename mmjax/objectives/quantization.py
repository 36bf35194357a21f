"""Vector quantisation for UniCode's VQ tokenizer: nearest-code lookup, straight-through quantisation,
the commitment loss and the EMA codebook update (vector-quantize-pytorch's EuclideanCodebook).

The EMA statistics of a step are plain sums (`ema_stats`), so they add across micro-batches and,
being sums over global arrays, across every device of the global batch; `ema_update` then folds
the summed statistics into the running ones once per step. UniCode's LLM-aligned codebook is
`blend(rescale_to(c_ema, llm_rows), llm_rows, ramp(step, start, end))`; `restart_dead` revives
unused codes; `quantize_stacked` applies one codebook D times (concatenated or residual).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def nearest(x: jax.Array, codebook: jax.Array, chunk: int = 0) -> jax.Array:
    """argmin_k ||x - c_k||^2 for x [N, D], codebook [K, D] -> int32 indices [N].

    Computed as ||x||^2 - 2 x C^T + ||C||^2 in float32 (HIGHEST: no bfloat16 rounding on TPU).
    `chunk` > 0: rows in chunks of that many (a `lax.map`), so the [N, K] distances never exist at
    once, only [chunk, K]; N must be a multiple of it.
    """
    x, c = x.astype(jnp.float32), codebook.astype(jnp.float32)
    c2 = jnp.sum(c * c, -1)

    def rows(xs):  # ||x||^2 is the same for every code: the argmin needs only ||c||^2 - 2 x.c
        return jnp.argmin(c2 - 2 * jnp.matmul(xs, c.T, precision=jax.lax.Precision.HIGHEST), -1)

    if chunk and chunk < x.shape[0]:
        if x.shape[0] % chunk:
            raise ValueError(f"nearest: {x.shape[0]} rows are not a multiple of chunk={chunk}")
        return jax.lax.map(rows, x.reshape(-1, chunk, x.shape[-1])).reshape(-1).astype(jnp.int32)
    return rows(x).astype(jnp.int32)


def quantize(x: jax.Array, codebook: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(quantized [N, D], indices [N]); quantized = x + stop_gradient(q - x), the straight-through
    estimator: its value is the nearest code, its gradient w.r.t. x the identity, and none reaches
    the codebook (that moves by `ema_update`)."""
    indices = nearest(x, codebook)
    q = codebook[indices].astype(x.dtype)
    return x + jax.lax.stop_gradient(q - x), indices


def quantize_stacked(
    z: jax.Array, codebook: jax.Array, depth: int, aggregate: str, chunk: int = 0
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """UniCode's stacked quantization of features z [..., F] with one shared codebook [K, E].

    - 'concat': F = depth * E; the D slices of z are quantised on their own and concatenated
      (straight through), aggregated [..., D * E].
    - 'cumsum': F = E; residual quantisation: layer d quantises what layers < d left, the
      aggregate is the sum of the D codes, [..., E] (straight through as a whole).

    Returns (aggregated, codes int32 [..., D], inputs [..., D, E]: what each layer quantised (the
    EMA statistics' features and the commitment loss's), their codes' vectors [..., D, E], which
    carry the gradient to the codebook a codebook loss needs).
    """
    K, E = codebook.shape
    lead = z.shape[:-1]
    flat = lambda a: a.reshape(-1, E)  # noqa: E731
    if aggregate == "concat":
        if z.shape[-1] != depth * E:
            raise ValueError(f"concat: features of width {z.shape[-1]} != depth {depth} x code width {E}")
        inputs = z.reshape(*lead, depth, E)
        idx = nearest(flat(inputs), codebook, chunk).reshape(*lead, depth)
        q = codebook[idx].astype(z.dtype)
        return z + jax.lax.stop_gradient(q.reshape(z.shape) - z), idx, inputs, q
    if aggregate != "cumsum":
        raise ValueError(f"aggregate={aggregate!r}; choose concat or cumsum")
    if z.shape[-1] != E:
        raise ValueError(f"cumsum: features of width {z.shape[-1]} != code width {E}")
    residual, ids, inputs, qs = z, [], [], []
    for _ in range(depth):
        i = nearest(flat(residual), codebook, chunk).reshape(lead)
        q = codebook[i].astype(z.dtype)
        ids.append(i)
        inputs.append(residual)
        qs.append(q)
        residual = residual - jax.lax.stop_gradient(q)
    q = jnp.stack(qs, -2)
    return z + jax.lax.stop_gradient(q.sum(-2) - z), jnp.stack(ids, -1), jnp.stack(inputs, -2), q


def commitment_loss(x: jax.Array, quantized: jax.Array, beta: float = 0.25) -> jax.Array:
    """beta * mean((x - stop_gradient(quantized))^2), a float32 scalar: pulls the encoder output
    towards its code (vector-quantize-pytorch's commitment_weight * mse_loss)."""
    diff = x.astype(jnp.float32) - jax.lax.stop_gradient(quantized).astype(jnp.float32)
    return beta * jnp.mean(diff * diff)


def ema_stats(x: jax.Array, indices: jax.Array, num_codes: int) -> tuple[jax.Array, jax.Array]:
    """(counts [K], sums [K, D]), float32: how many of x's rows chose each code and their sum.

    Additive: sum them over micro-batches and devices before `ema_update`. A scatter-add
    (`segment_sum`, float32 accumulation; indices outside [0, K) are dropped), so no [N, K] one-hot
    exists and no N x K x D matmul runs (benchmarks/vq_ema.py).
    """
    counts = jax.ops.segment_sum(jnp.ones(indices.shape, jnp.float32), indices, num_segments=num_codes)
    sums = jax.ops.segment_sum(x.astype(jnp.float32), indices, num_segments=num_codes)
    return counts, sums


def ema_update(
    cluster_size: jax.Array,
    embed_sum: jax.Array,
    counts: jax.Array,
    sums: jax.Array,
    decay: float = 0.99,
    eps: float = 1e-5,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(cluster_size [K], embed_sum [K, D], codebook [K, D]) after one EMA step.

    vector-quantize-pytorch's EuclideanCodebook: both statistics decay towards the step's, and the
    codebook is embed_sum over the Laplace-smoothed cluster sizes (so an unused code never divides
    by zero; the smoothing keeps their total n).
    """
    cluster_size = decay * cluster_size + (1 - decay) * counts
    embed_sum = decay * embed_sum + (1 - decay) * sums
    return cluster_size, embed_sum, ema_codebook(cluster_size, embed_sum, eps)


def ema_codebook(cluster_size: jax.Array, embed_sum: jax.Array, eps: float = 1e-5) -> jax.Array:
    """The codebook [K, D] of EMA statistics: embed_sum over the Laplace-smoothed cluster sizes."""
    n = cluster_size.sum()
    smoothed = (cluster_size + eps) / (n + cluster_size.shape[0] * eps) * n
    return embed_sum / smoothed[:, None]


def restart_dead(
    cluster_size: jax.Array, embed_sum: jax.Array, rng: jax.Array, threshold: float, noise: float = 0.01
) -> tuple[jax.Array, jax.Array]:
    """Dead codes (EMA cluster size < threshold) restarted next to live ones: each takes a donor
    drawn by usage, the donor's EMA mean plus `noise` x its RMS of Gaussian jitter, with cluster
    size `threshold` (it dies again, and draws anew, unless features choose it).

    A function of the state and `rng` only, so every device (same rng, replicated state) restarts
    the same codes the same way. Returns (cluster_size, embed_sum)."""
    live = cluster_size >= threshold
    dead = ~live & jnp.any(live)
    mean = embed_sum / jnp.maximum(cluster_size, 1e-12)[:, None]
    k1, k2 = jax.random.split(rng)
    K = cluster_size.shape[0]  # inverse-CDF draws: O(K log K), not categorical's K x K Gumbel noise
    donor = mean[jax.random.choice(k1, K, (K,), p=jnp.where(live, cluster_size, 0.0))]
    rms = jnp.sqrt(jnp.mean(donor * donor, -1, keepdims=True))
    fresh = donor + noise * rms * jax.random.normal(k2, mean.shape)
    return (
        jnp.where(dead, threshold, cluster_size),
        jnp.where(dead[:, None], fresh * threshold, embed_sum),
    )


def code_stats(counts: jax.Array) -> dict[str, jax.Array]:
    """From per-code counts [K]: usage (share of codes used), perplexity (exp of the code
    distribution's entropy) and the largest code's share."""
    p = counts / jnp.maximum(counts.sum(), 1e-12)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return {"usage": jnp.mean(counts > 0), "perplexity": jnp.exp(entropy), "top_share": p.max()}


def rescale_to(codebook: jax.Array, rows: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Each code c_k with its direction kept and its L2 norm set to that of rows[k] ([K, D])."""
    norm = lambda a: jnp.sqrt(jnp.maximum(jnp.sum(a * a, -1, keepdims=True), eps * eps))
    return codebook / norm(codebook) * norm(rows)


def blend(c_ema: jax.Array, c_llm: jax.Array, a: jax.Array | float) -> jax.Array:
    """(1 - a) c_ema + a c_llm."""
    return (1 - a) * c_ema + a * c_llm


def ramp(step: jax.Array | int, start: int, end: int) -> jax.Array:
    """A float32 linear ramp: 0 up to `start`, 1 from `end` on (a step at `end` when end <= start)."""
    step = jnp.asarray(step, jnp.float32)
    if end <= start:
        return (step >= end).astype(jnp.float32)
    return jnp.clip((step - start) / (end - start), 0.0, 1.0)
