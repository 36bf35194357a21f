"""MM-DiT generator (FLUX style): double-stream blocks, then single-stream blocks, adaLN-zero.

`MMDiT(x, t, cond, cond_mask, pooled) -> v`: x [B, H, W, C] (pixels or autoencoder latents),
t [B] in [0, 1] (t=1 noise, t=0 data), cond [B, Tc, cond_dim] with cond_mask [B, Tc] (True = real
token; None: all real), pooled [B, pooled_dim] (pooled_dim > 0 only). Output [B, H, W, C] float32.

The architecture is diffusers' `FluxTransformer2DModel` (see mmjax/interop/diffusers_flux.py, which
imports its weights exactly) plus: patchify/unpatchify inside (`patch_size`; FLUX packs 2x2 latents
outside, i.e. patch_size=1 on packed latents), an optional pooled condition, condition-token padding
masks, learned absolute positions as an alternative to 2-D RoPE, and zero-initialised modulation and
output projections (every block starts as the identity and the model outputs exactly 0 at init).

  c = time_embedder(sinusoid(1000 t)) [+ pooled_embedder(pooled)];  vec = silu(c)
  double block: per stream (img, txt) separate adaLN-zero modulation (6 x D from vec), norms, q/k/v
    (+ RMSNorm on q, k), out and MLP; ONE joint attention over concat(txt, img)
  single block: on concat(txt, img): h = modulate(LN(x)); x + gate * (attn(h) @ out + gelu(h wi) @ wo)
    (FLUX's parallel block; its proj_out over concat(attn, mlp) is split into attn/out and mlp/wo)
  final: image tokens, adaLN (scale, shift from vec), proj_out, unpatchify

Positions: 'rope': 2-D RoPE on q, k (FLUX layout: interleaved pairs, theta 10000), image token (i, j)
at (row i, col j), condition tokens at (0, 0) (FLUX's zero txt_ids). rope_axes = (row dims, col dims);
the first head_dim - sum(rope_axes) dims are never rotated (FLUX's first rope axis, whose ids are 0).
'learned': a [gh, gw, D] table added to the image tokens (resized bilinearly at other grids), no rope.

Param tree (scan=False; scan=True replaces `block_{i}` by one `blocks` subtree whose leaves have a
leading `layers` axis; `stack_blocks` / `unstack_blocks` convert):
  x_embedder/{kernel [p*p*C, D], bias}           patch rows flattened as (p1 p2 c)
  pos_embedding [gh, gw, D]                       positions='learned' only
  context_embedder/{kernel [cond_dim, D], bias}
  time_embedder/{wi [256, D], wo [D, D]}          (+ biases) sinusoid -> silu MLP
  pooled_embedder/{wi [P, D], wo [D, D]}          pooled_dim > 0 only
  double_blocks/block_{i}/{img,txt}_mod/{kernel [D, 6, D], bias [6, D]}   shift, scale, gate (attn), x2 (mlp)
  double_blocks/block_{i}/{img,txt}_attn/{q,k,v [D, H, hd], q_norm, k_norm, out [H, hd, D]}
  double_blocks/block_{i}/{img,txt}_mlp/{wi [D, F], wo [F, D]}
  single_blocks/block_{i}/mod/{kernel [D, 3, D], bias}                     shift, scale, gate
  single_blocks/block_{i}/attn/{q,k,v, q_norm, k_norm, out [H, hd, D] (no bias)}
  single_blocks/block_{i}/mlp/{wi [D, F], wo [F, D]}
  final_mod/{kernel [D, 2, D], bias}               scale, shift (FLUX's norm_out order)
  proj_out/{kernel [D, p*p*C], bias}
"""

import math
from collections.abc import Mapping
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.models import remat
from mmjax.models.layers import Mlp, RMSNorm, dense, interpolate_posemb

Dtype = Any
zeros = nn.initializers.zeros
ACT = ('batch', 'length', 'act_embed')
HEADS = ('batch', 'length', 'act_heads', 'act_kv')


def timestep_embedding(t: jax.Array, dim: int = 256, max_period: float = 10_000.0) -> jax.Array:
    """t [B] in [0, 1] -> [B, dim] float32: FLUX's sinusoid of 1000 t, cos half first
    (diffusers Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0))."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = (t.astype(jnp.float32) * 1000.0)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def rope_angles(positions: jax.Array, head_dim: int, axes: tuple[int, ...], theta: float) -> jax.Array:
    """positions [S, len(axes)] -> angles [S, head_dim // 2] float32 (one per rotated pair).

    Axis i rotates axes[i] dims (axes[i] / 2 pairs, frequencies theta^(-2k / axes[i])); the leading
    head_dim - sum(axes) dims get angle 0 (never rotated)."""
    lead = head_dim - sum(axes)
    assert lead >= 0 and lead % 2 == 0 and all(a % 2 == 0 for a in axes), (head_dim, axes)
    parts = [jnp.zeros((positions.shape[0], lead // 2), jnp.float32)]
    for i, a in enumerate(axes):
        freqs = 1.0 / theta ** (np.arange(0, a, 2, dtype=np.float64) / a)
        parts.append(positions[:, i].astype(jnp.float32)[:, None] * jnp.asarray(freqs, jnp.float32)[None])
    return jnp.concatenate(parts, axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, S, H, hd] with pairs (2k, 2k+1) rotated by cos/sin [S, hd // 2] (FLUX/diffusers layout)."""
    shape = x.shape
    xp = x.reshape(*shape[:-1], shape[-1] // 2, 2)
    x0, x1 = xp[..., 0], xp[..., 1]
    c, s = cos[None, :, None].astype(x.dtype), sin[None, :, None].astype(x.dtype)
    return jnp.stack([x0 * c - x1 * s, x1 * c + x0 * s], axis=-1).reshape(shape)


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm without scale or bias (computed in float32, returned in x's dtype)."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """LN(x) * (1 + scale) + shift; x [B, L, D], shift/scale [B, D]."""
    return layer_norm(x, eps) * (1 + scale[:, None]) + shift[:, None]


class AttnProj(nn.Module):
    """One stream's attention projections: q/k/v [embed, heads, kv] (+ RMSNorm on q, k) and out."""

    width: int  # out projection's output
    num_heads: int
    head_dim: int
    qk_norm: bool = True
    out_bias: bool = True
    norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        heads = (self.num_heads, self.head_dim)
        self.q, self.k, self.v = (dense(heads, ('embed', 'heads', 'kv'), name=n, **kw) for n in 'qkv')
        self.o = dense(
            self.width, ('heads', 'kv', 'embed'), axis=(-2, -1), use_bias=self.out_bias, name='out', **kw
        )
        if self.qk_norm:
            scale = nn.with_logical_partitioning(nn.initializers.ones, ('kv',))
            self.q_norm, self.k_norm = (
                RMSNorm(epsilon=self.norm_eps, scale_init=scale, name=n, **kw) for n in ('q_norm', 'k_norm')
            )

    def qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        q, k, v = (nn.with_logical_constraint(p(x), HEADS) for p in (self.q, self.k, self.v))
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def out(self, o: jax.Array) -> jax.Array:
        return nn.with_logical_constraint(self.o(o), ACT)


def attention(q, k, v, rope, mask):
    """Joint attention core: rope (cos, sin) or None, mask [B, 1, 1, S] bool (key padding) or None."""
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    o = jax.nn.dot_product_attention(q, k, v, mask=mask)
    return nn.with_logical_constraint(o, HEADS)


class DoubleBlock(nn.Module):
    """Double-stream block: separate weights per stream, one joint attention over concat(txt, img)."""

    num_heads: int
    head_dim: int
    mlp_dim: int
    qk_norm: bool = True
    norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, carry, vec, rope, mask):
        img, txt = carry
        d, eps = img.shape[-1], self.norm_eps
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        mod = lambda name: dense(  # noqa: E731
            (6, d), ('embed', None, 'mlp'), kernel_init=zeros, name=name, **kw
        )(vec)
        im, tm = mod('img_mod'), mod('txt_mod')
        attn_kw = dict(
            width=d, num_heads=self.num_heads, head_dim=self.head_dim, qk_norm=self.qk_norm, norm_eps=eps
        )
        img_attn = AttnProj(**attn_kw, name='img_attn', **kw)
        txt_attn = AttnProj(**attn_kw, name='txt_attn', **kw)
        qi, ki, vi = img_attn.qkv(modulate(img, im[:, 0], im[:, 1], eps))
        qt, kt, vt = txt_attn.qkv(modulate(txt, tm[:, 0], tm[:, 1], eps))
        cat = lambda a, b: jnp.concatenate([a, b], axis=1)  # noqa: E731
        o = attention(cat(qt, qi), cat(kt, ki), cat(vt, vi), rope, mask)
        n = txt.shape[1]
        img = img + im[:, 2, None] * img_attn.out(o[:, n:])
        txt = txt + tm[:, 2, None] * txt_attn.out(o[:, :n])
        mlp = lambda name: Mlp(self.mlp_dim, act='gelu_tanh', name=name, **kw)  # noqa: E731
        img = img + im[:, 5, None] * mlp('img_mlp')(modulate(img, im[:, 3], im[:, 4], eps))
        txt = txt + tm[:, 5, None] * mlp('txt_mlp')(modulate(txt, tm[:, 3], tm[:, 4], eps))
        return (nn.with_logical_constraint(img, ACT), nn.with_logical_constraint(txt, ACT)), None


class SingleBlock(nn.Module):
    """Single-stream (parallel attention + MLP) block over concat(txt, img)."""

    num_heads: int
    head_dim: int
    mlp_dim: int
    qk_norm: bool = True
    norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, vec, rope, mask):
        d = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        m = dense((3, d), ('embed', None, 'mlp'), kernel_init=zeros, name='mod', **kw)(vec)
        h = modulate(x, m[:, 0], m[:, 1], self.norm_eps)
        attn = AttnProj(
            width=d,
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            qk_norm=self.qk_norm,
            out_bias=False,
            norm_eps=self.norm_eps,
            name='attn',
            **kw,
        )
        o = attention(*attn.qkv(h), rope, mask)
        mlp = Mlp(self.mlp_dim, act='gelu_tanh', name='mlp', **kw)
        y = attn.out(o) + mlp(h)
        return nn.with_logical_constraint(x + m[:, 2, None] * y, ACT), None


class Stack(nn.Module):
    """`depth` blocks of one kind, optionally nn.scan'ed (`layers` param axis) and/or rematerialised."""

    block_cls: Any
    depth: int
    block: Mapping  # block kwargs
    scan: bool = False
    remat: bool | str = False  # models/remat.py: True = 'full', 'dots', 'offload', ...

    @nn.compact
    def __call__(self, carry, vec, rope, mask):
        block_cls = remat.wrap(self.block_cls, self.remat, scan=self.scan)
        if self.scan:
            block_cls = nn.scan(
                block_cls,
                variable_axes={'params': 0},
                split_rngs={'params': True},
                in_axes=(nn.broadcast,) * 3,
                length=self.depth,
                metadata_params={nn.PARTITION_NAME: 'layers'},
            )
            return block_cls(**self.block, name='blocks')(carry, vec, rope, mask)[0]
        for i in range(self.depth):
            carry, _ = block_cls(**self.block, name=f'block_{i}')(carry, vec, rope, mask)
        return carry


class MMDiT(nn.Module):
    """FLUX-style MM-DiT: (x [B, H, W, C], t [B], cond [B, Tc, cond_dim], cond_mask [B, Tc] | None,
    pooled [B, pooled_dim] | None) -> v [B, H, W, C] float32. See the module docstring."""

    width: int = 256
    num_heads: int = 4
    depth_double: int = 2
    depth_single: int = 4
    mlp_ratio: float = 4.0
    patch_size: int = 1
    in_channels: int = 16
    cond_dim: int = 64
    pooled_dim: int = 0  # 0: no pooled condition
    positions: str = 'rope'  # 'rope' (2-D RoPE) | 'learned' (absolute table on the image grid)
    grid: tuple[int, int] | None = None  # learned table's grid (tokens); None: the init input's
    rope_axes: tuple[int, int] | None = None  # (row dims, col dims); None: head_dim // 4 * 2 each
    rope_theta: float = 10_000.0
    qk_norm: bool = True
    norm_eps: float = 1e-6
    time_dim: int = 256  # sinusoid width of the timestep embedding
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan: bool = False
    remat: bool | str = False  # models/remat.py: True = 'full' (save nothing), 'dots', 'offload', ...

    def __post_init__(self):
        if self.positions not in ('rope', 'learned'):
            raise ValueError(f"positions must be 'rope' or 'learned', not {self.positions!r}")
        if self.width % self.num_heads:
            raise ValueError(f'width {self.width} is not a multiple of num_heads {self.num_heads}')
        for name in ('grid', 'rope_axes'):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)))  # hashable: jit-static
        super().__post_init__()

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def axes(self) -> tuple[int, int]:
        return self.rope_axes or (self.head_dim // 4 * 2,) * 2

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        cond: jax.Array,
        cond_mask: jax.Array | None = None,
        pooled: jax.Array | None = None,
    ) -> jax.Array:
        p, d, C = self.patch_size, self.width, self.in_channels
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        B, H, W, c_in = x.shape
        assert c_in == C, f'x has {c_in} channels, the model {C}'
        assert H % p == 0 and W % p == 0, f'input size {(H, W)} not divisible by patch size {p}'
        gh, gw = H // p, W // p
        Tc = cond.shape[1]

        img = einops.rearrange(x.astype(self.dtype), 'b (h p1) (w p2) c -> b (h w) (p1 p2 c)', p1=p, p2=p)
        img = dense(d, ('patch', 'embed'), name='x_embedder', **kw)(img)
        if self.positions == 'learned':
            if self.has_variable('params', 'pos_embedding'):
                pe = nn.unbox(self.get_variable('params', 'pos_embedding'))
            else:
                pe = self.param(
                    'pos_embedding',
                    nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, 'embed')),
                    (*(self.grid or (gh, gw)), d),
                    self.param_dtype,
                )
            pe = interpolate_posemb(pe.reshape(-1, d), pe.shape[:2], (gh, gw))
            img = img + pe.astype(self.dtype)[None]
            rope = None
        else:
            rows, cols = jnp.meshgrid(jnp.arange(gh), jnp.arange(gw), indexing='ij')
            pos = jnp.concatenate(
                [jnp.zeros((Tc, 2), jnp.int32), jnp.stack([rows.ravel(), cols.ravel()], -1)], axis=0
            )
            angles = rope_angles(pos, self.head_dim, self.axes, self.rope_theta)
            rope = (jnp.cos(angles), jnp.sin(angles))
        img = nn.with_logical_constraint(img, ACT)
        txt = nn.with_logical_constraint(dense(d, (None, 'embed'), name='context_embedder', **kw)(cond), ACT)

        c = Embedder(d, name='time_embedder', **kw)(timestep_embedding(t, self.time_dim).astype(self.dtype))
        if self.pooled_dim:
            assert pooled is not None and pooled.shape[-1] == self.pooled_dim, 'pooled [B, pooled_dim] needed'
            c = c + Embedder(d, name='pooled_embedder', **kw)(pooled.astype(self.dtype))
        vec = nn.silu(c)

        mask = None
        if cond_mask is not None:
            keys = jnp.concatenate([cond_mask.astype(bool), jnp.ones((B, gh * gw), bool)], axis=1)
            mask = keys[:, None, None, :]
        block = dict(
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            mlp_dim=int(d * self.mlp_ratio),
            qk_norm=self.qk_norm,
            norm_eps=self.norm_eps,
            **kw,
        )
        stack = dict(block=block, scan=self.scan, remat=self.remat)
        img, txt = Stack(DoubleBlock, self.depth_double, **stack, name='double_blocks')(
            (img, txt), vec, rope, mask
        )
        h = jnp.concatenate([txt, img], axis=1)
        h = Stack(SingleBlock, self.depth_single, **stack, name='single_blocks')(h, vec, rope, mask)
        img = h[:, Tc:]

        m = dense((2, d), ('embed', None, 'mlp'), kernel_init=zeros, name='final_mod', **kw)(vec)
        img = modulate(img, m[:, 1], m[:, 0], self.norm_eps)
        out = dense(p * p * C, ('embed', 'patch'), kernel_init=zeros, bias_init=zeros, name='proj_out', **kw)(
            img
        )
        out = einops.rearrange(out, 'b (h w) (p1 p2 c) -> b (h p1) (w p2) c', h=gh, w=gw, p1=p, p2=p)
        return out.astype(jnp.float32)


class Embedder(nn.Module):
    """wi -> silu -> wo (diffusers TimestepEmbedding / PixArtAlphaTextProjection with act silu)."""

    width: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(dense(self.width, ('embed', 'mlp'), name='wi', **kw)(x))
        return dense(self.width, ('mlp', 'embed'), name='wo', **kw)(h)


def stack_blocks(params: Mapping) -> dict:
    """Unscanned params ({double,single}_blocks/block_{i}) -> the scan=True layout (`blocks`, leading
    layers axis)."""
    out = dict(params)
    for name in ('double_blocks', 'single_blocks'):
        sub = params.get(name, {})
        if 'blocks' in sub or not sub:
            continue
        blocks = [sub[f'block_{i}'] for i in range(len(sub))]
        out[name] = {'blocks': jax.tree.map(lambda *xs: np.stack(xs), *blocks)}
    return out


def unstack_blocks(params: Mapping) -> dict:
    """The scan=True layout -> {double,single}_blocks/block_{i}; unscanned params pass through."""
    out = dict(params)
    for name in ('double_blocks', 'single_blocks'):
        sub = params.get(name, {})
        if 'blocks' not in sub:
            continue
        depth = jax.tree.leaves(sub['blocks'])[0].shape[0]
        out[name] = {f'block_{i}': jax.tree.map(lambda x: x[i], sub['blocks']) for i in range(depth)}
    return out
