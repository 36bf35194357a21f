"""MM1's vision-language connectors: vision patches [B, N, Dv] -> LLM tokens [B, num_tokens, out_dim].

The patches form a square g x g grid, row-major (N = g * g, no class token). Connectors:
  avg_pool      n x n average pooling (n = g / sqrt(num_tokens)) + linear projection (MM1)
  attn_pool     num_tokens learned queries cross-attending to the patches + linear projection (MM1)
  c_abstractor  Honeybee's C-Abstractor: RegNet bottleneck stage -> adaptive average pooling to
                sqrt(num_tokens)^2 -> RegNet stage -> MLP readout (the connector MM1 picked)
  mlp           LLaVA-1.5's 2-layer GELU MLP per patch; num_tokens = N
`build(kind, **kwargs)` picks one by name. Grids are NHWC; a 1x1 convolution is a `dense` over channels.
"""

import dataclasses
import math
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.models.layers import Attention, LayerNorm, Mlp, dense, interpolate_posemb

Dtype = Any
GRID_AXES = ('batch', None, None, 'act_embed')


def _side(n: int, what: str) -> int:
    """sqrt(n) for a positive perfect square n, else a ValueError naming `what`."""
    if n <= 0 or math.isqrt(n) ** 2 != n:
        raise ValueError(f'{what} must be a positive perfect square (a square grid), got {n}')
    return math.isqrt(n)


def _to_grid(x: jax.Array) -> jax.Array:
    """[B, N, D] -> [B, g, g, D] (row-major)."""
    g = _side(x.shape[1], 'the number of vision patches N')
    return nn.with_logical_constraint(einops.rearrange(x, 'b (h w) d -> b h w d', h=g, w=g), GRID_AXES)


def _to_tokens(x: jax.Array) -> jax.Array:
    """[B, h, w, D] -> [B, h*w, D] with (batch, length, act_embed) axes."""
    return nn.with_logical_constraint(
        einops.rearrange(x, 'b h w d -> b (h w) d'), ('batch', 'length', 'act_embed')
    )


def _pool_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] averaging weights of torch's adaptive pooling: output i averages the inputs
    floor(i * n_in / n_out) .. ceil((i + 1) * n_in / n_out) - 1."""
    m = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        lo, hi = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


def adaptive_avg_pool(x: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
    """[B, H, W, C] -> [B, oh, ow, C], as torch.nn.functional.adaptive_avg_pool2d (any H, W, oh, ow)."""
    ph = jnp.asarray(_pool_matrix(x.shape[1], out_hw[0]), x.dtype)
    pw = jnp.asarray(_pool_matrix(x.shape[2], out_hw[1]), x.dtype)
    return jnp.einsum('ih,bhwc,jw->bijc', ph, x, pw)


class AvgPool(nn.Module):
    """n x n average pooling of the patch grid, then a linear projection to out_dim (MM1)."""

    num_tokens: int
    out_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        _side(self.num_tokens, f'{type(self).__name__}.num_tokens')
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        grid = _to_grid(x.astype(self.dtype))
        g, k = grid.shape[1], _side(self.num_tokens, 'num_tokens')
        if g % k:
            raise ValueError(
                f'avg_pool needs sqrt(num_tokens)={k} to divide the {g}x{g} patch grid; '
                f'use num_tokens in {[(g // n) ** 2 for n in range(1, g + 1) if g % n == 0]} or c_abstractor'
            )
        pooled = einops.reduce(grid, 'b (h n1) (w n2) d -> b h w d', 'mean', n1=g // k, n2=g // k)
        out = dense(
            self.out_dim, ('embed', 'mlp'), dtype=self.dtype, param_dtype=self.param_dtype, name='proj'
        )
        return _to_tokens(out(pooled))


class AttnPool(nn.Module):
    """num_tokens learned queries cross-attend to the patches (layers.Attention), then a linear
    projection to out_dim (MM1's attention pooling)."""

    num_tokens: int
    out_dim: int
    num_heads: int = 8
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        if self.num_tokens <= 0 or self.num_heads <= 0:
            raise ValueError(
                f'AttnPool needs num_tokens > 0 and num_heads > 0, got {self.num_tokens}, {self.num_heads}'
            )
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, _, d = x.shape
        if d % self.num_heads:
            raise ValueError(f'attn_pool: num_heads={self.num_heads} must divide the vision width {d}')
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        queries = self.param(
            'queries',
            nn.with_logical_partitioning(nn.initializers.normal(stddev=d**-0.5), (None, 'embed')),
            (self.num_tokens, d),
            self.param_dtype,
        )
        q = jnp.broadcast_to(queries.astype(self.dtype), (b, self.num_tokens, d))
        y = Attention(num_heads=self.num_heads, name='attn', **kw)(q, x.astype(self.dtype))
        y = dense(self.out_dim, ('embed', 'mlp'), name='proj', **kw)(y)
        return nn.with_logical_constraint(y, ('batch', 'length', 'act_embed'))


class Bottleneck(nn.Module):
    """timm's RegNet bottleneck as Honeybee configures it (bottle_ratio 1, group_size 1, i.e. a
    depthwise 3x3, SE ratio 0.25 of the input width, SiLU, LayerNorm after every conv), NHWC:
    act(LN(conv3(SE(conv2(conv1(x))))) + shortcut(x)); shortcut = LN(1x1 conv) when widths differ."""

    features: int
    se_ratio: float = 0.25
    layer_norm_eps: float = 1e-6  # timm LayerNorm2d
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, kw = self.features, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        mlp_axes = ('batch', None, None, 'act_mlp')

        def norm(name, axis):
            ones, zeros = nn.initializers.ones, nn.initializers.zeros
            return LayerNorm(
                epsilon=self.layer_norm_eps,
                scale_init=nn.with_logical_partitioning(ones, (axis,)),
                bias_init=nn.with_logical_partitioning(zeros, (axis,)),
                name=name,
                **kw,
            )

        h = nn.silu(norm('norm1', 'mlp')(dense(c, ('embed', 'mlp'), use_bias=False, name='conv1', **kw)(x)))
        h = nn.with_logical_constraint(h, mlp_axes)
        h = nn.Conv(
            c,
            (3, 3),
            padding='SAME',
            feature_group_count=c,
            use_bias=False,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), (None, None, None, 'mlp')
            ),
            name='conv2',
            **kw,
        )(h)
        h = nn.silu(norm('norm2', 'mlp')(h))
        se = max(1, round(x.shape[-1] * self.se_ratio))
        s = nn.silu(dense(se, ('mlp', None), name='se_reduce', **kw)(h.mean(axis=(1, 2), keepdims=True)))
        h = h * nn.sigmoid(dense(c, (None, 'mlp'), name='se_expand', **kw)(s))
        h = norm('norm3', 'embed')(dense(c, ('mlp', 'embed'), use_bias=False, name='conv3', **kw)(h))
        if x.shape[-1] != c:
            x = norm('shortcut_norm', 'embed')(
                dense(c, ('embed', 'mlp'), use_bias=False, name='shortcut', **kw)(x)
            )
        return nn.with_logical_constraint(nn.silu(h + x), GRID_AXES)


class CAbstractor(nn.Module):
    """Honeybee's C-Abstractor (MM1's connector): [+ learned posemb] -> `depth` bottlenecks (Dv ->
    hidden_dim) -> adaptive avg-pool to sqrt(num_tokens)^2 -> `depth` bottlenecks -> Linear, SiLU,
    Linear readout. The grid need not be a multiple of sqrt(num_tokens). A stored posemb is
    bilinearly resized when the apply-time grid differs from init."""

    num_tokens: int
    out_dim: int
    hidden_dim: int | None = None  # None: the vision width
    depth: int = 3
    pos_emb: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        _side(self.num_tokens, f'{type(self).__name__}.num_tokens')
        if self.depth < 1:
            raise ValueError(f'CAbstractor.depth must be >= 1, got {self.depth}')
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        grid = _to_grid(x.astype(self.dtype))
        g, k, d = grid.shape[1], _side(self.num_tokens, 'num_tokens'), grid.shape[-1]
        if k > g:
            raise ValueError(f'c_abstractor cannot make num_tokens={self.num_tokens} from {g}x{g} patches')
        if self.pos_emb:
            if self.has_variable('params', 'pos_embedding'):  # apply: the init grid may differ from this one
                pe = nn.unbox(self.get_variable('params', 'pos_embedding'))
            else:
                init = nn.with_logical_partitioning(
                    nn.initializers.truncated_normal(0.02), (None, None, 'embed')
                )
                pe = self.param('pos_embedding', init, (g, g, d), self.param_dtype)
            pe = interpolate_posemb(pe.reshape(-1, d), pe.shape[:2], (g, g)).reshape(g, g, d)
            grid = grid + pe.astype(self.dtype)
        hidden = self.hidden_dim or d
        for i in range(self.depth):
            grid = Bottleneck(hidden, name=f's1_b{i}', **kw)(grid)
        grid = nn.with_logical_constraint(adaptive_avg_pool(grid, (k, k)), GRID_AXES)
        for i in range(self.depth):
            grid = Bottleneck(hidden, name=f's2_b{i}', **kw)(grid)
        return _to_tokens(Mlp(self.out_dim, out_dim=self.out_dim, act='silu', name='readout', **kw)(grid))


class MlpProjector(nn.Module):
    """LLaVA-1.5's projector: Linear, GELU, Linear on every patch; num_tokens is N (None: not checked)."""

    out_dim: int
    num_tokens: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.num_tokens is not None and self.num_tokens != x.shape[1]:
            raise ValueError(
                f'mlp keeps one token per patch: num_tokens={self.num_tokens} but the input has {x.shape[1]} '
                'patches; use a pooling connector to change the count'
            )
        mlp = Mlp(
            self.out_dim,
            out_dim=self.out_dim,
            act='gelu',
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name='mlp',
        )
        return nn.with_logical_constraint(mlp(x.astype(self.dtype)), ('batch', 'length', 'act_embed'))


CONNECTORS = {'avg_pool': AvgPool, 'attn_pool': AttnPool, 'c_abstractor': CAbstractor, 'mlp': MlpProjector}


def build(kind: str, **kwargs) -> nn.Module:
    """The connector named `kind` (a key of CONNECTORS); kwargs are its module fields (and `name`)."""
    if kind not in CONNECTORS:
        raise ValueError(f'unknown connector {kind!r}; valid: {", ".join(CONNECTORS)}')
    cls = CONNECTORS[kind]
    fields = [f.name for f in dataclasses.fields(cls) if f.name != 'parent']
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        raise ValueError(f'connector {kind!r} has no option(s) {unknown}; options: {", ".join(fields)}')
    return cls(**kwargs)
