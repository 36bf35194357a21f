"""Next-token cross-entropy over masked positions (captioning, MM1's text loss)."""

from __future__ import annotations

import jax
import optax

from mmjax.objectives.reduce import Mean


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-position cross-entropy [B, T] (float32) of logits [B, T, V] against integer targets."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype("float32"), targets)


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[Mean, jax.Array]:
    """(the mean cross-entropy over positions where `mask`, as a Mean; the per-position values)."""
    ce = token_cross_entropy(logits, targets)
    return Mean.of(ce, mask), ce
