"""Next-token cross-entropy over masked positions (captioning, MM1's text loss), from logits or, in
chunks of the sequence, from hidden states and the LM head (no [B, T, V] logits at full length)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from mmjax.objectives.reduce import Mean


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-position cross-entropy [B, T] (float32) of logits [B, T, V] against integer targets."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype("float32"), targets)


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[Mean, jax.Array]:
    """(the mean cross-entropy over positions where `mask`, as a Mean; the per-position values)."""
    ce = token_cross_entropy(logits, targets)
    return Mean.of(ce, mask), ce


def chunked_token_cross_entropy(
    head: Callable[[jax.Array], jax.Array], hidden: jax.Array, targets: jax.Array, chunk: int
) -> jax.Array:
    """`token_cross_entropy(head(hidden), targets)` [B, T], `chunk` positions at a time: a lax.map over
    chunks of hidden [B, T, D] whose body is rematerialised, so only one chunk's logits [B, chunk, V]
    live at once, forward and backward. chunk <= 0 or >= T: one piece (the full logits)."""
    B, T = targets.shape
    if chunk <= 0 or chunk >= T:
        return token_cross_entropy(head(hidden), targets)
    pad = -T % chunk
    n = (T + pad) // chunk
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(B, n, chunk, hidden.shape[-1])
    t = jnp.pad(targets, ((0, 0), (0, pad))).reshape(B, n, chunk)

    @jax.checkpoint
    def piece(args):
        h, t = args
        return token_cross_entropy(head(h), t)

    ce = jax.lax.map(piece, (h.swapaxes(0, 1), t.swapaxes(0, 1)))  # [n, B, chunk]
    return ce.swapaxes(0, 1).reshape(B, n * chunk)[:, :T]


def masked_chunked_cross_entropy(
    head: Callable[[jax.Array], jax.Array], hidden: jax.Array, targets: jax.Array, mask: jax.Array, chunk: int
) -> tuple[Mean, jax.Array]:
    """`masked_cross_entropy` of the logits head(hidden), computed in chunks (see above)."""
    ce = chunked_token_cross_entropy(head, hidden, targets, chunk)
    return Mean.of(ce, mask), ce
