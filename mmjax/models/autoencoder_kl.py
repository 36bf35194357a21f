"""AutoencoderKL: the KL-regularised image autoencoder of latent diffusion (diffusers' `AutoencoderKL`), NHWC.

The same computation as diffusers (Encoder / Decoder in vae.py, ResnetBlock2D, Downsample2D with
padding 0, Upsample2D, the mid block's single-head self-attention): fp32 weights imported with
`mmjax convert hf-import` (mmjax/interop/diffusers_vae.py) reproduce its encoder moments and decoder
output. Images are [B, H, W, C] in [-1, 1]; latents [B, H/f, W/f, latent_channels], f = 2^(levels-1).

Param tree (C_i = block_out_channels[i], L = latent_channels):
  encoder/conv_in                               3x3, in_channels -> C_0
  encoder/down_{i}/resnet_{j}                   j < layers_per_block: {norm1, conv1, norm2, conv2[, conv_shortcut]}
  encoder/down_{i}/downsample                   3x3 stride-2 conv (zero pad right/bottom), all levels but the last
  encoder/mid/{resnet_0, attn, resnet_1}        attn = {norm, q, k, v, out} (attn iff mid_block_add_attention)
  encoder/{norm_out, conv_out}                  GroupNorm, SiLU, 3x3 conv -> 2L (mean, logvar)
  quant_conv                                    1x1, 2L -> 2L (iff use_quant_conv)
  post_quant_conv                               1x1, L -> L (iff use_post_quant_conv)
  decoder/conv_in                               3x3, L -> C_last
  decoder/mid/{resnet_0, attn, resnet_1}
  decoder/up_{i}/resnet_{j}                     j <= layers_per_block, level i = C_{last-i}
  decoder/up_{i}/upsample                       nearest x2 then 3x3 conv, all levels but the last
  decoder/{norm_out, conv_out}                  GroupNorm, SiLU, 3x3 conv -> out_channels
Conv kernels are [kh, kw, in, out] (HWIO). Logical axes: a conv kernel's output axis and its bias
are 'conv' when the output is a feature width (C_i), None when it is an image or latent width
(conv_out, quant_conv, post_quant_conv); spatial and input axes are None. GroupNorm scale/bias are
on 'conv'; attention q/k/v kernels [C, C] are ('conv', None), out is (None, 'conv'). 'conv' is its
own axis, replicated by the default rules: sharding these small kernels over fsdp costs an
all-gather of batch-sized activations per layer (BENCHMARKS.md, section 17).
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.layers import dense

Dtype = Any
GRID_AXES = ('batch', None, None, 'act_embed')
NORM_EPS = 1e-6  # diffusers' VAE: every GroupNorm (resnets, attention, norm_out)


def _conv(
    features: int, kernel: int, name: str, *, wide: bool, stride: int = 1, padding=None, **kw
) -> nn.Conv:
    """A conv whose kernel is [k, k, in, features]; `wide`: the output axis (and bias) on 'conv'."""
    axis = 'conv' if wide else None
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((kernel // 2, kernel // 2),) * 2 if padding is None else padding,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None, None, axis)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axis,)),
        name=name,
        **kw,
    )


def _group_norm(groups: int, name: str, **kw) -> nn.GroupNorm:
    return nn.GroupNorm(
        num_groups=groups,
        epsilon=NORM_EPS,
        use_fast_variance=False,  # two-pass variance: VAE activations have large means
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ('conv',)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('conv',)),
        name=name,
        **kw,
    )


class ResnetBlock(nn.Module):
    """diffusers' ResnetBlock2D without a time embedding: x + conv2(silu(gn2(conv1(silu(gn1(x)))))),
    the shortcut a 1x1 `conv_shortcut` when the width changes."""

    features: int
    norm_num_groups: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(_group_norm(self.norm_num_groups, 'norm1', **kw)(x))
        h = _conv(self.features, 3, 'conv1', wide=True, **kw)(h)
        h = nn.silu(_group_norm(self.norm_num_groups, 'norm2', **kw)(h))
        h = _conv(self.features, 3, 'conv2', wide=True, **kw)(h)
        if x.shape[-1] != self.features:
            x = _conv(self.features, 1, 'conv_shortcut', wide=True, **kw)(x)
        return nn.with_logical_constraint(x.astype(h.dtype) + h, GRID_AXES)


class SpatialSelfAttention(nn.Module):
    """The VAE mid block's attention: GroupNorm, one head over all H*W positions (head_dim = C,
    softmax in fp32), output projection, residual."""

    norm_num_groups: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hh, ww, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = _group_norm(self.norm_num_groups, 'norm', **kw)(x).reshape(b, hh * ww, c)
        q, k, v = (dense(c, ('conv', None), name=n, **kw)(h)[:, :, None, :] for n in 'qkv')
        o = jax.nn.dot_product_attention(q, k, v).reshape(b, hh * ww, c)
        o = dense(c, (None, 'conv'), name='out', **kw)(o).reshape(b, hh, ww, c)
        return nn.with_logical_constraint(x.astype(o.dtype) + o, GRID_AXES)


class MidBlock(nn.Module):
    """resnet_0 -> [attn] -> resnet_1 at the width of the input."""

    norm_num_groups: int
    add_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(norm_num_groups=self.norm_num_groups, dtype=self.dtype, param_dtype=self.param_dtype)
        x = ResnetBlock(x.shape[-1], name='resnet_0', **kw)(x)
        if self.add_attention:
            x = SpatialSelfAttention(name='attn', **kw)(x)
        return ResnetBlock(x.shape[-1], name='resnet_1', **kw)(x)


class DownBlock(nn.Module):
    """DownEncoderBlock2D: `num_resnets` resnets to `features`, then (iff `downsample`) Downsample2D
    with padding 0: zero-pad right/bottom, 3x3 stride-2 conv."""

    features: int
    num_resnets: int
    norm_num_groups: int
    downsample: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_resnets):
            h = ResnetBlock(self.features, self.norm_num_groups, name=f'resnet_{j}', **kw)(h)
        if self.downsample:
            pad = ((0, 1), (0, 1))
            h = _conv(self.features, 3, 'downsample', wide=True, stride=2, padding=pad, **kw)(h)
        return h


class UpBlock(nn.Module):
    """UpDecoderBlock2D: `num_resnets` resnets to `features`, then (iff `upsample`) Upsample2D:
    nearest x2, 3x3 conv."""

    features: int
    num_resnets: int
    norm_num_groups: int
    upsample: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_resnets):
            h = ResnetBlock(self.features, self.norm_num_groups, name=f'resnet_{j}', **kw)(h)
        if self.upsample:
            h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
            h = _conv(self.features, 3, 'upsample', wide=True, **kw)(h)
        return h


class Encoder(nn.Module):
    """Images [B, H, W, in] -> [B, H/f, W/f, out_features] (before quant_conv)."""

    out_features: int
    block_out_channels: Sequence[int]
    layers_per_block: int
    norm_num_groups: int
    mid_block_add_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        rkw = dict(norm_num_groups=self.norm_num_groups, **kw)
        chans = tuple(self.block_out_channels)
        h = _conv(chans[0], 3, 'conv_in', wide=True, **kw)(x.astype(self.dtype))
        for i, c in enumerate(chans):
            last = i == len(chans) - 1
            h = DownBlock(c, self.layers_per_block, downsample=not last, name=f'down_{i}', **rkw)(h)
        h = MidBlock(add_attention=self.mid_block_add_attention, name='mid', **rkw)(h)
        h = nn.silu(_group_norm(self.norm_num_groups, 'norm_out', **kw)(h))
        return _conv(self.out_features, 3, 'conv_out', wide=False, **kw)(h)


class Decoder(nn.Module):
    """Latents [B, h, w, L] (after post_quant_conv) -> images [B, h*f, w*f, out_features]."""

    out_features: int
    block_out_channels: Sequence[int]
    layers_per_block: int
    norm_num_groups: int
    mid_block_add_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        rkw = dict(norm_num_groups=self.norm_num_groups, **kw)
        chans = tuple(reversed(tuple(self.block_out_channels)))
        h = _conv(chans[0], 3, 'conv_in', wide=True, **kw)(z.astype(self.dtype))
        h = MidBlock(add_attention=self.mid_block_add_attention, name='mid', **rkw)(h)
        for i, c in enumerate(chans):
            last = i == len(chans) - 1
            h = UpBlock(c, self.layers_per_block + 1, upsample=not last, name=f'up_{i}', **rkw)(h)
        h = nn.silu(_group_norm(self.norm_num_groups, 'norm_out', **kw)(h))
        return _conv(self.out_features, 3, 'conv_out', wide=False, **kw)(h)


def encoder_decoder(m: nn.Module, encoder_out: int, decoder_out: int) -> tuple[Encoder, Decoder]:
    """An Encoder and a Decoder built from module `m`'s fields (block_out_channels,
    layers_per_block, norm_num_groups, mid_block_add_attention, dtype, param_dtype); call it in
    `m.setup`."""
    net = dict(
        block_out_channels=tuple(m.block_out_channels),
        layers_per_block=m.layers_per_block,
        norm_num_groups=m.norm_num_groups,
        mid_block_add_attention=m.mid_block_add_attention,
        dtype=m.dtype,
        param_dtype=m.param_dtype,
    )
    return Encoder(out_features=encoder_out, **net), Decoder(out_features=decoder_out, **net)


class AutoencoderKL(nn.Module):
    """diffusers' AutoencoderKL (fields as its config.json). `encode`, `decode`, and for a latent
    generator `to_latent` / `from_latent`, which apply `(z - shift_factor) * scaling_factor` and its
    inverse. Call a method with `model.apply({'params': p}, x, method='to_latent')`. Outputs are
    float32 whatever `dtype` computes in. `__call__` (what `init` runs) reconstructs."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: Sequence[int] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def downsample_factor(self) -> int:
        """Image side / latent side."""
        return 2 ** (len(self.block_out_channels) - 1)

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        lat = self.latent_channels
        self.encoder, self.decoder = encoder_decoder(self, 2 * lat, self.out_channels)
        self.quant_conv = _conv(2 * lat, 1, 'quant_conv', wide=False, **kw) if self.use_quant_conv else None
        self.post_quant_conv = (
            _conv(lat, 1, 'post_quant_conv', wide=False, **kw) if self.use_post_quant_conv else None
        )

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images [B, H, W, in_channels] in [-1, 1] -> (mean, logvar), each [B, H/f, W/f, latent_channels];
        logvar clamped to [-30, 20] (diffusers' DiagonalGaussianDistribution)."""
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: jax.Array) -> jax.Array:
        """Unscaled latents [B, h, w, latent_channels] -> images [B, h*f, w*f, out_channels] (~[-1, 1])."""
        z = z.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def to_latent(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """Images -> generator latents: the posterior mean (rng None) or a sample, then
        `(z - shift_factor) * scaling_factor`."""
        mean, logvar = self.encode(x)
        z = mean if rng is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
        return (z - (self.shift_factor or 0.0)) * self.scaling_factor

    def from_latent(self, z: jax.Array) -> jax.Array:
        """Generator latents -> images: `z / scaling_factor + shift_factor`, then `decode`."""
        return self.decode(z.astype(jnp.float32) / self.scaling_factor + (self.shift_factor or 0.0))

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Images -> (reconstruction, mean, logvar); decodes a posterior sample when `rng` is given."""
        mean, logvar = self.encode(x)
        z = mean if rng is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
        return self.decode(z), mean, logvar


def from_meta(meta: dict, **overrides) -> AutoencoderKL:
    """The AutoencoderKL of a weights folder's meta (`weights.read_meta` / `weights.load`); overrides
    e.g. dtype=jnp.bfloat16."""
    if meta.get('kind') != 'autoencoder_kl':
        raise ValueError(f"weights of kind {meta.get('kind')!r} are not an AutoencoderKL")
    model = {**meta['model'], **overrides}
    model['block_out_channels'] = tuple(model['block_out_channels'])
    return AutoencoderKL(**model)
