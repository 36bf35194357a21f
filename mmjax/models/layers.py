"""Shared building blocks (ViT, LLM, connectors, MM-DiT, RQA), annotated with logical axes.

Modules know logical axis names only; the trainer maps them to a mesh.
  params:      embed, mlp, heads, kv, vocab, patch, layers (stacked by nn.scan)
  activations: batch, length, act_embed, act_mlp, act_heads, act_kv
Every module takes `dtype` (compute) and `param_dtype` (storage, default float32).
"""

import functools
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


ATTENTION_IMPLS = ('xla', 'cudnn', 'splash', 'auto')


def _platform() -> str:
    """The platform the traced step compiles for: the current mesh's (a TPU slice's compile-only
    devices under `mmjax plan --topology`, on a CPU host), else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, 'abstract_device', None)
    return device.platform if device is not None else jax.default_backend()


def attention_impl(name: str, dtype: Dtype = jnp.bfloat16) -> str:
    """The kernel `name` runs: 'auto' is cuDNN flash attention on a Hopper-or-later GPU (its packed
    layout needs sm90; 16-bit compute only), splash attention on a TPU, else the dense XLA path."""
    if name not in ATTENTION_IMPLS:
        raise ValueError(f'attention={name!r}; choose one of {", ".join(ATTENTION_IMPLS)}')
    if name != 'auto':
        return name
    backend = _platform()
    if backend == 'gpu' and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        capability = getattr(jax.devices()[0], 'compute_capability', '0')
        return 'cudnn' if float(capability) >= 9.0 else 'xla'
    return 'splash' if backend == 'tpu' else 'xla'


def segment_mask(segment_ids: jax.Array, is_causal: bool) -> jax.Array:
    """[B, 1, T, T] bool: same segment (and key <= query when causal), the dense reference."""
    mask = segment_ids[:, :, None] == segment_ids[:, None, :]
    if is_causal:
        T = segment_ids.shape[1]
        mask = mask & jnp.tril(jnp.ones((T, T), bool))
    return mask[:, None]


def packed_offsets(segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cuDNN's packed layout of rows of contiguous segments [B, T]: (seqlen [B, T], offsets [B, T + 1])
    int32, each run of equal ids (padding's included) a segment; unused entries -1."""
    B, T = segment_ids.shape
    start = jnp.concatenate([jnp.ones((B, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    starts = jax.vmap(lambda s: jnp.nonzero(s, size=T + 1, fill_value=-1)[0])(start).astype(jnp.int32)
    ends = jnp.where(starts[:, 1:] >= 0, starts[:, 1:], T)
    seqlen = jnp.where(starts[:, :-1] >= 0, ends - starts[:, :-1], -1).astype(jnp.int32)
    return seqlen, starts


def _cudnn(q, k, v, segment_ids, is_causal, scale):
    """cuDNN flash attention; segment ids become its packed (THD) layout (needs sm90+)."""
    from jax._src.cudnn import fused_attention_stablehlo as fa  # packing is not in jax.nn's API yet

    if segment_ids is None:
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=is_causal, implementation='cudnn')
    seqlen, offsets = packed_offsets(segment_ids)
    kind = fa.MaskType.PADDING_CAUSAL if is_causal else fa.MaskType.PADDING
    return fa.dot_product_attention(
        q, k, v, q_seqlen=seqlen, kv_seqlen=seqlen, q_offsets=offsets, kv_offsets=offsets,
        scale=scale, mask_type=kind, qkv_layout='BTNH',
    )  # fmt: skip


def _block(T: int) -> int:
    for b in (512, 256, 128):
        if T % b == 0:
            return b
    raise ValueError(f'splash attention needs a length that is a multiple of 128, got {T}')


def _host_device_context():
    """Eager work inside a trace on this host's default device, outside the mesh's devices."""
    from jax._src import sharding_impls  # private: jax.set_mesh cannot be used inside jit

    return sharding_impls._internal_use_concrete_mesh(sharding_impls.empty_concrete_mesh)


@functools.lru_cache(maxsize=16)
def _splash_kernel(T: int, group: int, is_causal: bool, interpret: bool):
    """(the MQA kernel of `group` query heads over T tokens, SegmentIds); cached: its mask info is
    computed on the host."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    one = sm.CausalMask((T, T)) if is_causal else sm.FullMask((T, T))
    b = _block(T)
    sizes = sk.BlockSizes(*(b,) * 8)  # q, kv, kv_compute; dkv: q, kv, kv_compute; dq: q, kv
    mask = sm.MultiHeadMask([one] * group)
    # concrete mask arrays (the cached kernel outlives this trace), made on this host's default
    # device, outside the mesh: under `mmjax plan --topology` the mesh's TPUs are compile-only
    with jax.ensure_compile_time_eval(), _host_device_context():
        kernel = sk.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)
    return kernel, sk.SegmentIds


def _splash(q, k, v, segment_ids, is_causal, scale):
    """TPU splash attention (Pallas interpret mode elsewhere): one MQA kernel per kv head, over the
    group of query heads that shares it; shard_map'ed over batch and heads under a mesh."""
    B, T, N, H = q.shape
    K = k.shape[2]
    kernel, SegmentIds = _splash_kernel(T, N // K, is_causal, _platform() != 'tpu')
    seg = jnp.ones((B, T), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)

    def run(q, k, v, seg):
        b, t, n, h = q.shape
        kk = k.shape[2]
        qh = (q * jnp.asarray(scale, q.dtype)).reshape(b, t, kk, n // kk, h).transpose(0, 2, 3, 1, 4)
        kh, vh = (x.transpose(0, 2, 1, 3) for x in (k, v))  # [B, K, T, H]
        one = lambda q, k, v, s: kernel(q, k, v, segment_ids=SegmentIds(s, s))  # noqa: E731
        heads = jax.vmap(one, in_axes=(0, 0, 0, None))  # over kv heads
        out = jax.vmap(heads)(qh, kh, vh, seg)  # [B, K, G, T, H]
        return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return run(q, k, v, seg)
    spec = nn.logical_to_mesh_axes(('batch', 'length', 'act_heads', 'act_kv'))
    spec = jax.sharding.PartitionSpec(*spec, *(None,) * (4 - len(spec)))
    if spec[1] is not None or spec[3] is not None:
        raise ValueError(f'splash attention shards batch and heads only; activations are {spec}')
    seg_spec = jax.sharding.PartitionSpec(spec[0], None)
    specs = dict(in_specs=(spec, spec, spec, seg_spec), out_specs=spec, check_vma=False)
    return jax.shard_map(run, mesh=mesh, **specs)(q, k, v, seg)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    is_causal: bool = False,
    segment_ids: jax.Array | None = None,
    implementation: str = 'xla',
) -> jax.Array:
    """q [B, T, N, H], k/v [B, S, K, H] -> [B, T, N, H]. `segment_ids` [B, T] (self-attention, S == T):
    a query sees keys of its own segment. The fused kernels ('cudnn', 'splash') take causality and
    segments as such, never a [B, 1, T, S] mask; with a `mask` or `bias`, on 'xla', or for splash a
    length that is not a multiple of 128, the dense path runs (the segments as a mask). cuDNN's
    packed layout needs contiguous segments (packed rows)."""
    impl = attention_impl(implementation, q.dtype)
    if impl == 'splash' and q.shape[1] % 128:
        impl = 'xla'  # splash tiles the sequence in blocks of 128
    if impl == 'xla' or mask is not None or bias is not None:
        if segment_ids is not None:
            seg = segment_mask(segment_ids, is_causal)
            mask, is_causal = seg if mask is None else mask & seg, False
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, is_causal=is_causal)
    fused = _cudnn if impl == 'cudnn' else _splash
    return fused(q, k, v, segment_ids, is_causal, 1.0 / math.sqrt(q.shape[-1]))


class Attention(nn.Module):
    """Multi-head (optionally grouped-query) attention with separate `q`/`k`/`v`/`out` projections.

    Kernels: q/k/v [embed, heads, kv], out [heads, kv, embed]. The core is `dot_product_attention`:
    `implementation` 'xla' (dense, `jax.nn.dot_product_attention`'s XLA path), 'cudnn', 'splash' or
    'auto' (`attention_impl`).
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
    implementation: str = 'xla'

    @nn.compact
    def __call__(
        self,
        inputs_q: jax.Array,
        inputs_kv: jax.Array | None = None,
        *,
        mask: jax.Array | None = None,
        bias: jax.Array | None = None,
        is_causal: bool = False,
        segment_ids: jax.Array | None = None,
        qk_fn: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]] | None = None,
        cache: dict[str, jax.Array] | None = None,
    ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
        """inputs_q [B, T, Dq], inputs_kv [B, S, Dkv] (None: self-attention) -> [B, T, out_dim].

        mask: bool, broadcastable to [B, heads, T, S] (True = attend); bias: additive logits bias.
        segment_ids [B, T]: self-attention within segments (see `dot_product_attention`).
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
        x = dot_product_attention(
            q, k, v, mask=mask, bias=bias, is_causal=is_causal, segment_ids=segment_ids,
            implementation='xla' if self.is_initializing() else self.implementation,
        )  # fmt: skip
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
