"""Decoder-only LLM (Llama / Qwen2 family): RMSNorm, RoPE, grouped-query attention, SwiGLU.

Param tree (scan=False; scan=True replaces block_{i} by one `blocks` subtree whose leaves have a
leading `layers` axis of size depth; `stack_layers` / `unstack_layers` convert):
  embedder/embedding [vocab, D]                          ('vocab', 'embed')
  decoder/block_{i}/attn_norm/scale
  decoder/block_{i}/attn/{q,k,v}/{kernel [D, H, hd], bias [H, hd]}   bias: qkv_bias only
  decoder/block_{i}/attn/out/{kernel [H, hd, D], bias [D]}          bias: out_bias only
  decoder/block_{i}/mlp_norm/scale
  decoder/block_{i}/mlp/{wg, wi} [D, F], mlp/wo [F, D]   SwiGLU: wo(silu(wg x) * wi x)
  decoder/block_{i}/moe/...  instead of mlp in MoE blocks (`moe=`), see mmjax/models/moe.py
  final_norm/scale
  lm_head/kernel [D, vocab]                              ('embed', 'vocab'); untied only

KV cache (functional, see `init_cache`): {'k', 'v': [depth, B, S_max, kv_heads, head_dim],
'valid': [B, S_max] bool (slots holding real tokens), 'index': int32 (next slot to write)}.
A call with `cache=` writes its T tokens at slots [index, index + T), attends causally (by slot)
over the valid slots and returns the advanced cache in aux['cache'].

MoE (MM1): `moe=dict(num_experts=8, top_k=2, every=1, ...)` (keys and defaults: moe.DEFAULTS) makes
every `every`-th block's FFN a MoeMlp. aux then holds 'moe_loss' (float32 scalar: the weighted
load-balance + router z-losses summed over MoE layers; add it to the training loss) and
'moe_metrics' ('load_balance_loss', 'z_loss', 'drop_fraction': means over MoE layers; 'expert_load'
[MoE layers, E]). Padding (attention_mask False, segment id 0) is neither routed nor counted.
"""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import FrozenDict

from mmjax.models import moe as moe_lib
from mmjax.models import remat as remat_lib
from mmjax.models.layers import ATTENTION_IMPLS, Attention, Mlp, RMSNorm, attention_impl, dense
from mmjax.models.rope import apply_rope, cos_sin, rope_type

Dtype = Any


# TinyLlama-1.1B's shape (vocab_size=0: the tokenizer's size), as `mmjax convert hf-import` states it
TINYLLAMA_1B = dict(
    width=2048,
    depth=22,
    num_heads=32,
    num_kv_heads=4,
    mlp_dim=5632,
    vocab_size=0,
    tie_embeddings=False,
    norm_eps=1e-5,
)


class Block(nn.Module):
    """Pre-norm decoder block: x + attn(attn_norm(x)); x + mlp(mlp_norm(x)).

    Returns (x, (layer cache, MoE aux or {})); `moe` (LLM.moe) makes the FFN a MoeMlp named `moe`."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    norm_eps: float = 1e-6
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    moe: Mapping | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    keep_hidden: bool = False  # aux['hidden']: this block's output (LLM.hidden_layer)
    attention: str = 'xla'  # LLM.attention

    @nn.compact
    def __call__(self, x, cache, cos, sin, masks, index, tokens_mask):
        """masks: {'mask': [B, 1, T, S]} (dense) or {'segment_ids': [B, T]} (causal, fused kernels)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        rope = lambda q, k: (apply_rope(q, cos, sin), apply_rope(k, cos, sin))  # noqa: E731
        attn = Attention(
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            qkv_bias=self.qkv_bias,
            out_bias=self.out_bias,
            implementation=self.attention,
            name='attn',
            **kw,
        )
        y = RMSNorm(epsilon=self.norm_eps, name='attn_norm', **kw)(x)
        causal = 'segment_ids' in masks
        if cache is None:
            y = attn(y, **masks, is_causal=causal, qk_fn=rope)
        else:
            y, cache = attn(y, **masks, is_causal=causal, qk_fn=rope, cache={**cache, 'index': index})
        x = x + y
        y = RMSNorm(epsilon=self.norm_eps, name='mlp_norm', **kw)(x)
        aux = {}
        if self.moe:
            fields = {k: self.moe[k] for k in ('num_experts', 'top_k', 'capacity_factor', 'group_size')}
            y, aux = moe_lib.MoeMlp(mlp_dim=self.mlp_dim, **fields, name='moe', **kw)(y, tokens_mask)
        else:
            y = Mlp(self.mlp_dim, act='silu', gated=True, use_bias=self.mlp_bias, name='mlp', **kw)(y)
        x = nn.with_logical_constraint(x + y, ('batch', 'length', 'act_embed'))
        return x, (cache, {**aux, 'hidden': x} if self.keep_hidden else aux)


class Decoder(nn.Module):
    """`depth` Blocks, optionally nn.scan'ed (`layers` param axis) and/or rematerialised.
    Returns (x, stacked layer caches, stacked MoE aux)."""

    depth: int
    block: Mapping  # Block kwargs
    scan: bool = False
    remat: str = ''  # models/remat.py
    moe: Mapping | None = None  # LLM.moe: blocks every-1, 2*every-1, ... are MoE

    @nn.compact
    def __call__(self, x, cache, cos, sin, masks, index, tokens_mask):
        block_cls = remat_lib.wrap(Block, self.remat, scan=self.scan)
        if self.scan:
            block_cls = nn.scan(
                block_cls,
                variable_axes={'params': 0},
                split_rngs={'params': True},
                in_axes=(0,) + (nn.broadcast,) * 5,
                length=self.depth,
                metadata_params={nn.PARTITION_NAME: 'layers'},
            )
            x, (cache, aux) = block_cls(**self.block, moe=self.moe, name='blocks')(
                x, cache, cos, sin, masks, index, tokens_mask
            )
            return x, cache, aux
        layers, auxs = [], []
        for i in range(self.depth):
            layer = None if cache is None else jax.tree.map(lambda c: c[i], cache)
            moe = self.moe if self.moe and (i + 1) % self.moe['every'] == 0 else None
            x, (layer, aux) = block_cls(**self.block, moe=moe, name=f'block_{i}')(
                x, layer, cos, sin, masks, index, tokens_mask
            )
            layers.append(layer)
            if aux:
                auxs.append(aux)
        stack = lambda xs: jax.tree.map(lambda *c: jnp.stack(c), *xs) if xs else {}  # noqa: E731
        return x, None if cache is None else stack(layers), stack(auxs)


class LLM(nn.Module):
    """tokens [B, T] (or embeddings [B, T, D]) -> (logits [B, T, vocab] float32, aux).

    aux: 'hidden' (final-normed hidden states [B, T, D]; with hidden_layer=k >= 0, HF's
      hidden_states[k]: the input embeddings for 0, block k's output otherwise); 'cache' when called
      with a cache.
    positions [B, T]: RoPE positions (default: arange, offset by the cache index when decoding);
      restart them per packed document. attention_mask [B, T]: False = padding key.
    segment_ids [B, T]: packed documents; a token attends only within its own segment.
    attention: 'xla' (a dense [B, 1, T, S] mask), 'cudnn', 'splash' or 'auto' (layers.attention_impl):
      the fused kernels get causality + segment ids (attention_mask False = segment 0) instead; the
      outputs at real tokens are the same, those at padding differ (padding attends to padding).
      Cached decoding always takes the dense path. cuDNN needs contiguous segments (packed rows).
    return_hidden=True (call): the final-normed hidden states [B, T, D] in place of the logits, for
      a chunked loss over `logits` (objectives.cross_entropy.chunked_token_cross_entropy).
    """

    vocab_size: int = 32000
    width: int = 2048
    depth: int = 22
    num_heads: int = 32
    num_kv_heads: int | None = None  # None: = num_heads
    head_dim: int | None = None  # None: width // num_heads
    mlp_dim: int = 5632
    rope_theta: float = 10000.0
    rope_scaling: Mapping | None = None  # HF-style dict, see mmjax/models/rope.py
    norm_eps: float = 1e-6
    qkv_bias: bool = False  # Qwen2: True
    out_bias: bool = False  # Llama attention_bias=True sets qkv_bias and out_bias
    mlp_bias: bool = False
    tie_embeddings: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan: bool = False
    remat: str = ''  # models/remat.py: '' / 'none', 'full', 'dots', 'offload' or a jax policy name
    moe: Mapping | None = None  # mixture-of-experts FFNs, keys of moe.DEFAULTS (module docstring)
    hidden_layer: int = -1  # aux['hidden']: -1 the last after final_norm, k in [0, depth) layer k's
    attention: str = 'xla'  # the attention kernel (class docstring)

    def __post_init__(self):
        if isinstance(self.rope_scaling, Mapping) and not isinstance(self.rope_scaling, FrozenDict):
            object.__setattr__(self, 'rope_scaling', FrozenDict(self.rope_scaling))  # hashable: jit-static
        rope_type(self.rope_scaling)
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f'attention={self.attention!r}; choose one of {", ".join(ATTENTION_IMPLS)}')
        if self.moe is not None:
            unknown = set(self.moe) - set(moe_lib.DEFAULTS)
            if unknown:
                raise ValueError(f'moe: unknown keys {sorted(unknown)}; known: {sorted(moe_lib.DEFAULTS)}')
            object.__setattr__(self, 'moe', FrozenDict({**moe_lib.DEFAULTS, **self.moe}))
            if not 1 <= self.moe['every'] <= self.depth:
                raise ValueError(f"moe every={self.moe['every']}: must be in [1, depth={self.depth}]")
            if self.scan and self.moe['every'] != 1:
                raise ValueError('scan=True needs identical blocks: use moe every=1 or scan=False')
            if self.mlp_bias:
                raise ValueError('MoE experts have no biases; set mlp_bias=False')
        if self.hidden_layer > 0 and self.moe and self.moe['every'] != 1:
            raise ValueError('hidden_layer > 0 with MoE needs moe every=1 (identical blocks)')
        if not -1 <= self.hidden_layer < self.depth:
            raise ValueError(
                f'hidden_layer={self.hidden_layer}: -1 (the last, normed) or 0..{self.depth - 1}'
            )
        super().__post_init__()

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.width // self.num_heads

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embedder = nn.Embed(
            self.vocab_size,
            self.width,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ('vocab', 'embed')),
            **kw,
        )
        block = dict(
            num_heads=self.num_heads,
            num_kv_heads=self.kv_heads,
            head_dim=self.head_size,
            mlp_dim=self.mlp_dim,
            norm_eps=self.norm_eps,
            qkv_bias=self.qkv_bias,
            out_bias=self.out_bias,
            mlp_bias=self.mlp_bias,
            keep_hidden=self.hidden_layer > 0,
            attention=self.attention,
            **kw,
        )
        self.decoder = Decoder(self.depth, FrozenDict(block), scan=self.scan, remat=self.remat, moe=self.moe)
        self.final_norm = RMSNorm(epsilon=self.norm_eps, **kw)
        if not self.tie_embeddings:
            self.lm_head = dense(self.vocab_size, ('embed', 'vocab'), use_bias=False, **kw)

    def embed(self, tokens: jax.Array) -> jax.Array:
        """tokens [B, T] -> input embeddings [B, T, D] (for splicing images in before `__call__`)."""
        return self.embedder(tokens)

    def logits(self, h: jax.Array) -> jax.Array:
        """Final-normed hidden states [..., D] -> float32 logits [..., vocab] (the LM head)."""
        logits = self.embedder.attend(h) if self.tie_embeddings else self.lm_head(h)
        return logits.astype(jnp.float32)

    def __call__(
        self,
        tokens: jax.Array | None = None,
        *,
        embeddings: jax.Array | None = None,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        cache: dict | None = None,
        return_hidden: bool = False,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        assert (tokens is None) != (embeddings is None), 'pass exactly one of tokens and embeddings'
        x = self.embedder(tokens) if embeddings is None else embeddings.astype(self.dtype)
        x = nn.with_logical_constraint(x, ('batch', 'length', 'act_embed'))
        B, T = x.shape[:2]
        keys = jnp.ones((B, T), bool) if attention_mask is None else attention_mask.astype(bool)
        tokens_mask = keys if segment_ids is None else keys & (segment_ids != 0)  # real tokens, for MoE
        index = None if cache is None else cache['index']
        if cache is None:
            slots = jnp.arange(T)
        else:
            assert segment_ids is None, 'segment_ids are for packed training sequences, not cached decoding'
            keys = jax.lax.dynamic_update_slice(cache['valid'], keys, (0, index))
            slots = index + jnp.arange(T)
        if cache is None and attention_impl(self.attention, self.dtype) != 'xla':
            segments = jnp.ones((B, T), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
            masks = {'segment_ids': jnp.where(keys, segments, 0)}
        else:
            masks = {'mask': make_mask(slots, keys, segment_ids)[:, None]}
        if positions is None:
            positions = jnp.broadcast_to(slots, (B, T))
        cos, sin = cos_sin(positions, self.head_size, self.rope_theta, self.rope_scaling)
        layers = None if cache is None else {'k': cache['k'], 'v': cache['v']}
        x0 = x
        x, layers, moe = self.decoder(x, layers, cos, sin, masks, index, tokens_mask)
        h = self.final_norm(x)
        aux = {'hidden': h}
        if self.hidden_layer >= 0:
            aux['hidden'] = moe.pop('hidden')[self.hidden_layer - 1] if self.hidden_layer else x0
        if self.moe:
            weights = self.moe['load_balance_weight'], self.moe['z_loss_weight']
            aux['moe_loss'] = weights[0] * moe['load_balance_loss'].sum() + weights[1] * moe['z_loss'].sum()
            aux['moe_metrics'] = {k: v if k == 'expert_load' else v.mean() for k, v in moe.items()}
        if cache is not None:
            aux['cache'] = {**layers, 'valid': keys, 'index': index + T}
        return (h if return_hidden else self.logits(h)), aux


def make_mask(slots: jax.Array, keys: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """[B, T, S] bool: the query at slot slots[t] sees key slot s if s <= slots[t] (causal), keys[b, s]
    (a real token) and, for packed rows (segment_ids [B, T], S == T), both are in the same document."""
    mask = (slots[:, None] >= jnp.arange(keys.shape[1])[None, :])[None] & keys[:, None, :]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return mask


def init_cache(model: LLM, batch: int, length: int, dtype: Dtype | None = None) -> dict[str, jax.Array]:
    """An empty KV cache for `batch` rows of up to `length` tokens (prompt + new tokens)."""
    shape = (model.depth, batch, length, model.kv_heads, model.head_size)
    zeros = jnp.zeros(shape, dtype or model.dtype)
    return {'k': zeros, 'v': zeros, 'valid': jnp.zeros((batch, length), bool), 'index': jnp.int32(0)}


def stack_layers(params: Mapping, depth: int) -> dict:
    """Unscanned params (decoder/block_{i}) -> the scan=True layout (decoder/blocks, leading layers axis)."""
    blocks = jax.tree.map(lambda *xs: np.stack(xs), *[params['decoder'][f'block_{i}'] for i in range(depth)])
    return {**params, 'decoder': {'blocks': blocks}}


def unstack_layers(params: Mapping) -> dict:
    """The scan=True layout -> decoder/block_{i}; unscanned params pass through."""
    if 'blocks' not in params['decoder']:
        return dict(params)
    blocks = params['decoder']['blocks']
    depth = jax.tree.leaves(blocks)[0].shape[0]
    return {
        **params,
        'decoder': {f'block_{i}': jax.tree.map(lambda x: x[i], blocks) for i in range(depth)},
    }


def grow_rows(table: jax.Array, axis: int, size: int, rng: jax.Array) -> jax.Array:
    """`table` extended along `axis` to `size` entries (added tokens): old entries are kept; new ones
    are the mean of the old plus noise with 1e-5 x their variance (HF's resize_token_embeddings
    init, diagonal)."""
    x = jnp.moveaxis(table, axis, 0)
    if size < x.shape[0]:
        raise ValueError(f'the vocabulary only grows; {size} < {x.shape[0]}')
    x32 = x.astype(jnp.float32)
    mean, std = x32.mean(0), x32.std(0)
    new = mean + jax.random.normal(rng, (size - x.shape[0], *x.shape[1:]), jnp.float32) * std * np.sqrt(1e-5)
    return jnp.moveaxis(jnp.concatenate([x, new.astype(table.dtype)]), 0, axis)


def resize_vocab(params: Mapping, new_vocab_size: int, rng: jax.Array) -> dict:
    """Grows the vocabulary (embedding rows and, if untied, lm_head columns) to `new_vocab_size`
    (`grow_rows`). Build the model with vocab_size=new_vocab_size to use the result."""
    k_embed, k_head = jax.random.split(rng)
    out = dict(params)
    out['embedder'] = {'embedding': grow_rows(params['embedder']['embedding'], 0, new_vocab_size, k_embed)}
    if 'lm_head' in params:
        out['lm_head'] = {'kernel': grow_rows(params['lm_head']['kernel'], 1, new_vocab_size, k_head)}
    return out
