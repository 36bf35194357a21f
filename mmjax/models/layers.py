"""Shared building blocks (ViT, LLM, connectors, MM-DiT, RQA), annotated with logical axes.

Modules know logical axis names only; the trainer maps them to a mesh.
  params:      embed, mlp, heads, kv, vocab, patch, layers (stacked by nn.scan)
  activations: batch, length, act_embed, act_mlp, act_heads, act_kv
Every module takes `dtype` (compute) and `param_dtype` (storage, default float32).
"""

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Initializer = Callable[..., jax.Array]
default_kernel_init = nn.initializers.xavier_uniform()


class DenseGeneral(nn.Module):
    """Contracts the trailing `axis` of x with a kernel [*in, *features] that carries `kernel_axes`.

    Unlike `nn.DenseGeneral`, the kernel is created at its full shape, so its logical box
    matches its rank (flax's initialises a flattened 2-D kernel and reshapes it after
    boxing, which breaks sharding constraints under a mesh). The initializer sees the
    flattened [prod(in), prod(out)] view, so fan-in/out (e.g. xavier) are right.
    """

    features: tuple[int, ...]
    kernel_axes: tuple[str | None, ...]
    axis: tuple[int, ...] = (-1,)
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        axis = tuple(sorted(a % x.ndim for a in self.axis))
        in_shape = tuple(x.shape[a] for a in axis)
        n_in, n_out = math.prod(in_shape), math.prod(self.features)

        def init(rng, shape, dtype):
            return self.kernel_init(rng, (n_in, n_out), dtype).reshape(shape)

        kernel = self.param(
            'kernel',
            nn.with_logical_partitioning(init, self.kernel_axes),
            in_shape + self.features,
            self.param_dtype,
        )
        x, kernel = jnp.asarray(x, self.dtype), jnp.asarray(kernel, self.dtype)
        y = jax.lax.dot_general(x, kernel, ((axis, tuple(range(len(axis)))), ((), ())))
        if self.use_bias:
            bias_axes = self.kernel_axes[len(axis) :]
            bias = self.param(
                'bias',
                nn.with_logical_partitioning(self.bias_init, bias_axes),
                self.features,
                self.param_dtype,
            )
            y = y + jnp.asarray(bias, self.dtype)
        return y


def dense(
    features: int | Sequence[int],
    kernel_axes: Sequence[str | None],
    *,
    axis: int | Sequence[int] = -1,
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    kernel_init: Initializer = default_kernel_init,
    bias_init: Initializer = nn.initializers.zeros,
    name: str | None = None,
) -> DenseGeneral:
    """A `DenseGeneral` whose kernel carries `kernel_axes` (input axes, then output axes);
    the bias takes the output part."""
    return DenseGeneral(
        features=(features,) if isinstance(features, int) else tuple(features),
        kernel_axes=tuple(kernel_axes),
        axis=(axis,) if isinstance(axis, int) else tuple(axis),
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=kernel_init,
        bias_init=bias_init,
        name=name,
    )


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm with `scale`/`bias` on the `embed` axis (pass scale_init/bias_init to change)."""

    scale_init: Initializer = nn.with_logical_partitioning(nn.initializers.ones, ('embed',))
    bias_init: Initializer = nn.with_logical_partitioning(nn.initializers.zeros, ('embed',))


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm with `scale` on the `embed` axis."""

    scale_init: Initializer = nn.with_logical_partitioning(nn.initializers.ones, ('embed',))


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'gelu': lambda x: nn.gelu(x, approximate=False),  # exact erf GELU (PyTorch nn.GELU, HF "gelu")
    'gelu_tanh': lambda x: nn.gelu(x, approximate=True),  # flax/big_vision default, HF "gelu_pytorch_tanh"
    'quick_gelu': lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP
    'silu': nn.silu,
}


def _constrain(x: jax.Array, feature_axis: str) -> jax.Array:
    """Constrain [B, L, F] activations to (batch, length, feature_axis); other ranks pass through."""
    return nn.with_logical_constraint(x, ('batch', 'length', feature_axis)) if x.ndim == 3 else x


class Mlp(nn.Module):
    """`wi` (embed->mlp) -> act -> dropout -> `wo` (mlp->embed); gated adds `wg`: act(wg x) * wi x (SwiGLU)."""

    mlp_dim: int
    out_dim: int | None = None  # default: input width
    act: str = 'gelu'
    gated: bool = False
    use_bias: bool = True
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = nn.initializers.normal(stddev=1e-6)  # as big_vision

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
        kw = dict(
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=self.kernel_init,
            bias_init=self.bias_init,
        )
        act = ACTIVATIONS[self.act]
        h = dense(self.mlp_dim, ('embed', 'mlp'), name='wi', **kw)(x)
        h = act(dense(self.mlp_dim, ('embed', 'mlp'), name='wg', **kw)(x)) * h if self.gated else act(h)
        h = _constrain(h, 'act_mlp')
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        return dense(self.out_dim or x.shape[-1], ('mlp', 'embed'), name='wo', **kw)(h)


class Attention(nn.Module):
    """Multi-head (optionally grouped-query) attention with separate `q`/`k`/`v`/`out` projections.

    Kernels: q/k/v [embed, heads, kv], out [heads, kv, embed]. The core is
    `jax.nn.dot_product_attention` (default implementation, so GPUs may pick cuDNN).
    """

    num_heads: int
    num_kv_heads: int | None = None  # None: = num_heads; must divide num_heads (GQA/MQA)
    head_dim: int | None = None  # None: input width // num_heads
    out_dim: int | None = None  # None: width of inputs_q
    qkv_bias: bool = True
    out_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = default_kernel_init

    @nn.compact
    def __call__(
        self,
        inputs_q: jax.Array,
        inputs_kv: jax.Array | None = None,
        *,
        mask: jax.Array | None = None,
        bias: jax.Array | None = None,
        is_causal: bool = False,
        qk_fn: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]] | None = None,
        cache: dict[str, jax.Array] | None = None,
    ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
        """inputs_q [B, T, Dq], inputs_kv [B, S, Dkv] (None: self-attention) -> [B, T, out_dim].

        mask: bool, broadcastable to [B, heads, T, S] (True = attend); bias: additive logits bias.
        qk_fn: hook applied to (q, k) of shape [B, T|S, heads, kv] before attention (e.g. RoPE).
        cache: KV-cache decoding, {'k', 'v': [B, S_max, kv_heads, kv], 'index': int scalar}: this
          call's k/v (after qk_fn) are written at slots [index, index + S) and the queries attend
          over all S_max slots (`mask` must cover them); returns (out, {'k', 'v'} updated).
        """
        inputs_kv = inputs_q if inputs_kv is None else inputs_kv
        head_dim = self.head_dim or inputs_q.shape[-1] // self.num_heads
        kv_heads = self.num_kv_heads or self.num_heads
        proj = lambda heads, name, x: dense(  # noqa: E731
            (heads, head_dim),
            ('embed', 'heads', 'kv'),
            use_bias=self.qkv_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=self.kernel_init,
            name=name,
        )(x)
        names = ('batch', 'length', 'act_heads', 'act_kv')
        q = nn.with_logical_constraint(proj(self.num_heads, 'q', inputs_q), names)
        k = nn.with_logical_constraint(proj(kv_heads, 'k', inputs_kv), names)
        v = nn.with_logical_constraint(proj(kv_heads, 'v', inputs_kv), names)
        if qk_fn is not None:
            q, k = qk_fn(q, k)
        if cache is not None:
            at = (0, cache['index'], 0, 0)
            k = jax.lax.dynamic_update_slice(cache['k'], k.astype(cache['k'].dtype), at)
            v = jax.lax.dynamic_update_slice(cache['v'], v.astype(cache['v'].dtype), at)
            cache = {'k': k, 'v': v}
        x = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, is_causal=is_causal)
        x = nn.with_logical_constraint(x, names)
        out = dense(
            self.out_dim or inputs_q.shape[-1],
            ('heads', 'kv', 'embed'),
            axis=(-2, -1),
            use_bias=self.out_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=self.kernel_init,
            name='out',
        )(x)
        out = _constrain(out, 'act_embed')
        return out if cache is None else (out, cache)


def sincos2d_posemb(
    h: int, w: int, width: int, temperature: float = 10_000.0, dtype: Dtype = jnp.float32
) -> jax.Array:
    """Fixed 2D sin-cos position embedding (MoCo v3 / big_vision layout) -> [h*w, width], row-major grid."""
    assert width % 4 == 0, 'width must be a multiple of 4 for sincos2d'
    y, x = jnp.mgrid[:h, :w]
    omega = 1.0 / temperature ** (jnp.arange(width // 4) / (width // 4 - 1 or 1))
    y = y.reshape(-1)[:, None] * omega[None]
    x = x.reshape(-1)[:, None] * omega[None]
    return jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1).astype(dtype)


def interpolate_posemb(
    posemb: jax.Array, old_hw: tuple[int, int], new_hw: tuple[int, int], method: str = 'bilinear'
) -> jax.Array:
    """Resize a grid position embedding [old_h*old_w, D] -> [new_h*new_w, D] (jax.image.resize,
    half-pixel centres, antialiased when shrinking). Identity when the grids match."""
    if tuple(old_hw) == tuple(new_hw):
        return posemb
    grid = posemb.reshape(*old_hw, posemb.shape[-1])
    return jax.image.resize(grid, (*new_hw, posemb.shape[-1]), method).reshape(-1, posemb.shape[-1])
