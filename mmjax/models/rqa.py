"""Residual Query Adapter (IOMM): N learned queries cross-attend over the condition sequence
`c` (the MLLM's input embeddings) and their output is appended, `c <- concat(c, q(c))`, before
the frozen MLLM reads the whole sequence. The adapter adds tokens; it never changes `c`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.layers import Attention, Dtype, Mlp, RMSNorm


class RQA(nn.Module):
    """c [B, L, D] + mask [B, L] (True = real token) -> (c' [B, L + N, D], mask' [B, L + N])."""

    num_queries: int
    num_heads: int
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, c: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        # the N query tokens: learned queries + pre-norm cross-attention over c + MLP
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        B, _, D = c.shape
        init = nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed"))
        q = jnp.broadcast_to(
            self.param("queries", init, (self.num_queries, D), self.param_dtype), (B, self.num_queries, D)
        )
        q = nn.with_logical_constraint(q.astype(self.dtype), ("batch", "length", "act_embed"))
        kv = RMSNorm(name="kv_norm", **kw)(c)
        attn = Attention(num_heads=self.num_heads, name="attn", **kw)
        q = q + attn(RMSNorm(name="q_norm", **kw)(q), kv, mask=mask[:, None, None, :])
        y = Mlp(int(self.mlp_ratio * D), act="gelu", name="mlp", **kw)(RMSNorm(name="mlp_norm", **kw)(q))
        q = nn.with_logical_constraint(q + y, ("batch", "length", "act_embed"))
        ones = jnp.ones(q.shape[:2], bool)
        return jnp.concatenate([c, q.astype(c.dtype)], 1), jnp.concatenate([mask.astype(bool), ones], 1)
