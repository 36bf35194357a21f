"""CLIP's symmetric contrastive (InfoNCE) loss over the global batch (CLIP, MM-GEM).

The embeddings are global arrays sharded over the batch; each logits matrix is constrained to the
logical axes ("batch", None), so each device computes and keeps only its rows: (B/N) x B floats per
matrix, as open_clip's `local_loss`, never the full B x B. XLA gathers the other side's embeddings
for the product (and reduce-scatters their gradient), so the loss and its gradients are the
single-device ones on the global batch.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

# The learnable temperature is a log-scale parameter: CLIP starts it at ln(1/0.07) and clamps it at
# ln(100) (open_clip after every optimizer step); the loss takes its exponential.
LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100)


def clamp_logit_scale(x: jax.Array) -> jax.Array:
    """The log-scale parameter capped at ln(100) (a logit scale of at most 100)."""
    return jnp.minimum(x, LOGIT_SCALE_MAX)


def normalise(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / ||x|| over the last axis, in float32 (the features the loss takes)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), eps * eps))


def _row_sharded_logits(a: jax.Array, b: jax.Array, logit_scale: jax.Array) -> jax.Array:
    # HIGHEST: float32 products on TPU too (the default rounds operands to bfloat16), cheap at B*B*D.
    logits = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
    return nn.with_logical_constraint(logit_scale * logits, ("batch", None))


def clip_logits(
    image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(logits_per_image [B, B], logits_per_text [B, B]), float32, each sharded by rows.

    image_emb, text_emb: [B, D], L2-normalised. logit_scale: the exponentiated scale (a scalar), as
    open_clip's `ClipLoss.forward(image_features, text_features, logit_scale)`. logits_per_text is
    its own row-sharded product text @ image.T, not a transpose (that would move whole columns).
    """
    image_emb, text_emb = image_emb.astype(jnp.float32), text_emb.astype(jnp.float32)
    logit_scale = jnp.asarray(logit_scale, jnp.float32)
    return (
        _row_sharded_logits(image_emb, text_emb, logit_scale),
        _row_sharded_logits(text_emb, image_emb, logit_scale),
    )


def clip_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array) -> jax.Array:
    """(CE(logits_per_image, arange(B)) + CE(logits_per_text, arange(B))) / 2, a float32 scalar.

    open_clip's `ClipLoss` with world_size 1 on the global batch: every example's negatives are the
    whole global batch. Under jit the gather of the other devices' embeddings is implicit and
    differentiable, so gradients flow to every example's embeddings; this avoids the classic
    bug of a stop_gradient on all-gathered features (gradients only through the local ones).

    The loss does not split into micro-batches: under gradient accumulation each micro-batch is
    its own contrastive batch (its negatives are the micro-batch's examples).
    """
    return loss_from_logits(*clip_logits(image_emb, text_emb, logit_scale))


def loss_from_logits(logits_per_image: jax.Array, logits_per_text: jax.Array) -> jax.Array:
    """`clip_loss` from `clip_logits`' output (for callers that also read the logits)."""
    labels = nn.with_logical_constraint(jnp.arange(logits_per_image.shape[0]), ("batch",))
    ce = lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()  # noqa: E731
    return (ce(logits_per_image) + ce(logits_per_text)) / 2
