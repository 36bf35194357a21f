"""Mixture-of-experts SwiGLU FFN (MM1's MoE variant): top-k routing, capacity-based dispatch, aux losses.

GShard/Switch style. Tokens are split into groups of S (default: one group per sequence); in each
group an expert takes at most C = min(S, ceil(capacity_factor * S * top_k / E)) assignments, first
choices before second choices, then in token order. Assignments past C are dropped (zero FFN output;
the residual stream carries the token), so with drops a token's output can depend on later tokens of
its group. C = S never drops (capacity_factor >= E / top_k), nor does a one-token decode step.
Dispatch and combine are one-hot einsums, so experts shard over the `expert` mesh axis with plain
jax.sharding: expert-side activations [E, G, C, *] are constrained to ('expert', 'expert_group', ...)
and XLA inserts the all-to-alls.

Params: router/kernel [D, E] ('embed', None), computed in float32;
  wg, wi [E, D, F] ('expert', 'embed', 'mlp'); wo [E, F, D] ('expert', 'mlp', 'embed').
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.layers import dense

Dtype = Any

# LLM(moe=...) keys: MoeMlp fields + loss weights (MM1: top-2, load balance 0.01, router z-loss 0.001).
# every=n: blocks n-1, 2n-1, ... are MoE, the others dense.
DEFAULTS = dict(
    num_experts=8,
    top_k=2,
    every=1,
    capacity_factor=1.25,
    group_size=None,
    load_balance_weight=0.01,
    z_loss_weight=0.001,
)


def top_k(probs: jax.Array, k: int) -> jax.Array:
    """Indices of the k largest of probs >= 0 (ties: lowest index first), by k argmax rounds:
    unlike jax.lax.top_k, argmax is partitioned over the batch dims instead of all-gathered."""
    idx = []
    for _ in range(k):
        idx.append(jnp.argmax(probs, -1))
        probs = jnp.where(jax.nn.one_hot(idx[-1], probs.shape[-1], dtype=bool), -1.0, probs)
    return jnp.stack(idx, -1)


class MoeMlp(nn.Module):
    """x [B, T, D], mask [B, T] (False: padding, never routed nor counted) -> (y [B, T, D], aux).

    aux (float32): 'load_balance_loss' E * sum_i f_i P_i (f_i: fraction of the top-k assignments that
    go to expert i, P_i: mean router probability; 1 when uniform), 'z_loss' mean logsumexp(logits)^2,
    'drop_fraction' (assignments over capacity), 'expert_load' [E] (f, before drops).
    """

    num_experts: int
    mlp_dim: int
    top_k: int = 2
    capacity_factor: float = 1.25
    group_size: int | None = None  # tokens per routing group; None: the sequence length
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        B, T, D = x.shape
        E, K = self.num_experts, self.top_k
        assert K <= E, f'top_k={K} > num_experts={E}'
        S = min(self.group_size or T, T)
        C = min(S, math.ceil(self.capacity_factor * S * K / E))
        pad = -T % S  # the last group of each row is padded with masked tokens
        mask = jnp.ones((B, T), bool) if mask is None else mask.astype(bool)
        m = jnp.pad(mask, ((0, 0), (0, pad))).reshape(-1, S)  # [G, S]
        xg = jnp.pad(x, ((0, 0), (0, pad), (0, 0))).reshape(-1, S, D)
        xg = nn.with_logical_constraint(xg, ('batch', 'length', 'act_embed'))
        G = xg.shape[0]

        logits = dense(
            E, ('embed', None), use_bias=False, dtype=jnp.float32, param_dtype=self.param_dtype, name='router'
        )(xg.astype(jnp.float32))  # [G, S, E]
        probs = jax.nn.softmax(logits)
        idx = top_k(probs, K)  # [G, S, K]
        gates = jnp.take_along_axis(probs, idx, -1)
        gates = gates / gates.sum(-1, keepdims=True)  # renormalised over the chosen k (Mixtral)
        choice = jax.nn.one_hot(idx, E, dtype=jnp.int32) * m[..., None, None]  # [G, S, K, E]
        # slot of each assignment in its expert's buffer: all first choices, then all second, ...
        ranked = choice.transpose(0, 2, 1, 3).reshape(G, K * S, E)
        pos = (jnp.cumsum(ranked, axis=1) - 1).reshape(G, K, S, E).transpose(0, 2, 1, 3)
        slot = jnp.sum(pos * choice, -1)  # [G, S, K]
        kept = (slot < C) & m[..., None]
        slot_1h = jax.nn.one_hot(jnp.where(kept, slot, C), C, dtype=self.dtype)  # dropped: zero row
        expert_1h = choice.astype(self.dtype)
        dispatch = jnp.einsum('gske,gskc->gsec', expert_1h, slot_1h)
        combine = jnp.einsum('gske,gskc->gsec', expert_1h * gates[..., None].astype(self.dtype), slot_1h)

        init = nn.initializers.xavier_uniform(in_axis=-2, out_axis=-1, batch_axis=(0,))  # per expert
        param = lambda name, shape, axes: jnp.asarray(  # noqa: E731
            self.param(name, nn.with_logical_partitioning(init, axes), shape, self.param_dtype), self.dtype
        )
        wg = param('wg', (E, D, self.mlp_dim), ('expert', 'embed', 'mlp'))
        wi = param('wi', (E, D, self.mlp_dim), ('expert', 'embed', 'mlp'))
        wo = param('wo', (E, self.mlp_dim, D), ('expert', 'mlp', 'embed'))
        # [E, G, C, *] buffers move between the tokens' devices (G sharded like `batch`) and the
        # experts' (E over `expert`): two constraints in a row make XLA emit an all-to-all
        at_tokens = lambda a: nn.with_logical_constraint(a, (None, 'batch', None, 'act_embed'))  # noqa: E731
        at_experts = lambda a, last: nn.with_logical_constraint(a, ('expert', 'expert_group', None, last))  # noqa: E731
        h = at_experts(at_tokens(jnp.einsum('gsec,gsd->egcd', dispatch, xg.astype(self.dtype))), 'act_embed')
        h = nn.silu(jnp.einsum('egcd,edf->egcf', h, wg)) * jnp.einsum('egcd,edf->egcf', h, wi)
        h = at_tokens(at_experts(jnp.einsum('egcf,efd->egcd', at_experts(h, 'act_mlp'), wo), 'act_embed'))
        y = nn.with_logical_constraint(
            jnp.einsum('gsec,egcd->gsd', combine, h), ('batch', 'length', 'act_embed')
        )
        y = y.reshape(B, T + pad, D)[:, :T]

        w = m.astype(jnp.float32)
        n = jnp.maximum(w.sum(), 1.0)
        load = choice.sum((0, 1, 2)).astype(jnp.float32) / (n * K)
        aux = {
            'load_balance_loss': E * jnp.sum(load * jnp.einsum('gse,gs->e', probs, w) / n),
            'z_loss': jnp.sum(jax.nn.logsumexp(logits, -1) ** 2 * w) / n,
            'drop_fraction': 1.0 - kept.sum() / (n * K),
            'expert_load': load,
        }
        return y, aux
