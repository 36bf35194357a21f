"""Loss and metric values that combine exactly: across gradient-accumulation micro-batches and,
being sums over global arrays, across every device of the global batch.

A recipe's loss (and any metric) may be
- `Mean(total, weight)`: a weighted mean kept as its numerator and denominator (a token-normalised
  loss: the masked sum and the token count); micro-batches add both and divide once;
- `Sum(total)`: a count or any additive quantity (tokens seen); micro-batches add it;
- a plain scalar: an equal-weight mean over micro-batches (right for per-example means of equal-sized
  micro-batches).
The trainer differentiates a Mean loss's `total` and divides the summed gradients by the summed
`weight`, so gradient accumulation gives the full batch's loss and gradients.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class Mean:
    total: jax.Array
    weight: jax.Array

    @classmethod
    def of(cls, values: jax.Array, mask: jax.Array | None = None) -> "Mean":
        """The mean of `values` where `mask` (all of them without a mask), as (sum, count)."""
        values = values.astype(jnp.float32)
        if mask is None:
            return cls(values.sum(), jnp.float32(values.size))
        mask = mask.astype(jnp.float32)
        return cls((values * mask).sum(), mask.sum())

    def value(self) -> jax.Array:
        return jnp.where(self.weight > 0, self.total / jnp.where(self.weight > 0, self.weight, 1.0), 0.0)


@flax.struct.dataclass
class Sum:
    total: jax.Array

    def value(self) -> jax.Array:
        return self.total


def _is_value(x) -> bool:
    return isinstance(x, (Mean, Sum))


def additive(tree):
    """`tree` with plain scalars as equal-weight Means, so every leaf adds across micro-batches."""
    return jax.tree.map(
        lambda x: x if _is_value(x) else Mean(jnp.asarray(x, jnp.float32), jnp.float32(1)),
        tree,
        is_leaf=_is_value,
    )


def finish(tree):
    """Mean and Sum leaves -> their values; other leaves pass through."""
    return jax.tree.map(lambda x: x.value() if _is_value(x) else x, tree, is_leaf=_is_value)
