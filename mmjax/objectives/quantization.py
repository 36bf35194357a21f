"""Vector quantisation for UniCode's VQ tokenizer: nearest-code lookup, straight-through quantisation,
the commitment loss and the EMA codebook update (vector-quantize-pytorch's EuclideanCodebook).

The EMA statistics of a step are plain sums (`ema_stats`), so they add across micro-batches and,
being sums over global arrays, across every device of the global batch; `ema_update` then folds
the summed statistics into the running ones once per step. UniCode's LLM-aligned codebook is
`blend(c_ema, rescale_to(c_ema, llm_rows), ramp(step, start, end))`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def nearest(x: jax.Array, codebook: jax.Array) -> jax.Array:
    """argmin_k ||x - c_k||^2 for x [N, D], codebook [K, D] -> int32 indices [N].

    Computed as ||x||^2 - 2 x C^T + ||C||^2 in float32 (HIGHEST: no bfloat16 rounding on TPU).
    """
    x, c = x.astype(jnp.float32), codebook.astype(jnp.float32)
    xc = jnp.matmul(x, c.T, precision=jax.lax.Precision.HIGHEST)
    d = jnp.sum(x * x, -1, keepdims=True) - 2 * xc + jnp.sum(c * c, -1)
    return jnp.argmin(d, -1).astype(jnp.int32)


def quantize(x: jax.Array, codebook: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(quantized [N, D], indices [N]); quantized = x + stop_gradient(q - x), the straight-through
    estimator: its value is the nearest code, its gradient w.r.t. x the identity, and none reaches
    the codebook (that moves by `ema_update`)."""
    indices = nearest(x, codebook)
    q = codebook[indices].astype(x.dtype)
    return x + jax.lax.stop_gradient(q - x), indices


def commitment_loss(x: jax.Array, quantized: jax.Array, beta: float = 0.25) -> jax.Array:
    """beta * mean((x - stop_gradient(quantized))^2), a float32 scalar: pulls the encoder output
    towards its code (vector-quantize-pytorch's commitment_weight * mse_loss)."""
    diff = x.astype(jnp.float32) - jax.lax.stop_gradient(quantized).astype(jnp.float32)
    return beta * jnp.mean(diff * diff)


def ema_stats(x: jax.Array, indices: jax.Array, num_codes: int) -> tuple[jax.Array, jax.Array]:
    """(counts [K], sums [K, D]), float32: how many of x's rows chose each code and their sum.

    Additive: sum them over micro-batches and devices before `ema_update`.
    """
    onehot = jax.nn.one_hot(indices, num_codes, dtype=jnp.float32)
    sums = jnp.matmul(onehot.T, x.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return onehot.sum(0), sums


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
    n = cluster_size.sum()
    smoothed = (cluster_size + eps) / (n + cluster_size.shape[0] * eps) * n
    return cluster_size, embed_sum, embed_sum / smoothed[:, None]


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
