"""MetaQuery-style connector (the RQA's baseline): N learned query tokens appended to the MLLM's
input; the generator reads the MLLM's hidden states at the query positions only, through a small
bidirectional transformer and Linear-GELU-Linear-RMSNorm (MetaQuery's connector)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import layers
from mmjax.models.layers import Dtype, RMSNorm
from mmjax.models.vit import Encoder


class Queries(nn.Module):
    """c [B, L, D] + mask [B, L] -> (concat(c, queries), mask'): the queries ignore c."""

    num_queries: int
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, c: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        init = nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed"))
        q = self.param("queries", init, (self.num_queries, c.shape[-1]), self.param_dtype)
        q = jnp.broadcast_to(q.astype(c.dtype), (c.shape[0], *q.shape))
        ones = jnp.ones(q.shape[:2], bool)
        return jnp.concatenate([c, q], 1), jnp.concatenate([mask.astype(bool), ones], 1)


class Connector(nn.Module):
    """Hidden states at the query positions [B, N, D_llm] -> [B, N, out_dim]."""

    out_dim: int
    depth: int = 2
    num_heads: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        D = h.shape[-1]
        block = dict(num_heads=self.num_heads, mlp_dim=4 * D, **kw)
        h = Encoder(self.depth, block, name="encoder")(h.astype(self.dtype))
        h = layers.dense(self.out_dim, ("embed", "mlp"), name="fc1", **kw)(h)
        h = layers.dense(self.out_dim, ("mlp", "embed"), name="fc2", **kw)(jax.nn.gelu(h))
        return RMSNorm(name="norm", **kw)(h)
