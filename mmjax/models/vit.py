"""Vision Transformer (big_vision / CLIP / SigLIP style) on the shared layers.

Param tree (scan=False; scan=True replaces block_{i} by one `blocks` subtree whose leaves have a
leading `layers` axis of size depth):
  embedding/{kernel [p*p*C, D], bias}      patch conv; kernel rows flattened as (p1 p2 c); bias iff patch_bias
  cls [1, D]                                class_token=True only (CLIP: class embedding + its position row)
  pos_embedding [gh, gw, D]                 posemb='learn' only (grid of the init resolution)
  ln_pre/{scale, bias}                      pre_norm=True only
  encoder/block_{i}/{ln_1, attn/{q,k,v,out}, ln_2, mlp/{wi,wo}}
  encoder_norm/{scale, bias}                on all tokens (final_norm='all') or pooled only ('pooled': CLIP)
  map_head/{probe [1, D], attn, ln, mlp}    pool='map' only
  head/{kernel [D, num_classes], bias}      num_classes > 0 only
"""

from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.models import remat
from mmjax.models.layers import Attention, LayerNorm, Mlp, dense, interpolate_posemb, sincos2d_posemb

Dtype = Any

# Pixel statistics a tower was trained with ([0, 1] units, as HF's image_mean / image_std). Images
# come in as [-1, 1] (every mmjax tower's and SigLIP's own: mean = std = 0.5); the ViT renormalises
# them to its tower's statistics, so one batch can feed towers trained differently.
# CLIP ViT-L/14 as `mmjax convert hf-import` states OpenAI's tower (OpenCLIP's: act='gelu'); configs
# start from it: dict(CLIP_L14, ...)
CLIP_L14 = dict(
    patch_size=14,
    width=1024,
    depth=24,
    num_heads=16,
    mlp_dim=4096,
    class_token=True,
    pre_norm=True,
    act="quick_gelu",
    layer_norm_eps=1e-5,
    patch_bias=False,
    posemb_resize="bicubic",
    pixels="clip",
)

PIXELS = {
    'signed': None,
    'clip': ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    'imagenet': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def renormalise(images: jax.Array, pixels: str) -> jax.Array:
    """[-1, 1] images -> the `pixels` preset's normalisation ((x01 - mean) / std)."""
    if pixels not in PIXELS:
        raise ValueError(f'unknown pixels {pixels!r}; choose one of {", ".join(PIXELS)}')
    if PIXELS[pixels] is None:
        return images
    mean, std = (np.asarray(v, np.float32) for v in PIXELS[pixels])
    return (images.astype(jnp.float32) + 1.0) * (0.5 / std) - mean / std


def _torch_bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of PyTorch's 1-D bicubic resize (align_corners=False, Keys A=-0.75,
    edge taps clamped, no antialias), the kernel of HF's interpolate_pos_encoding for CLIP/SigLIP."""
    a = -0.75
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    i0 = np.floor(src).astype(int)
    t = src - i0
    d = np.stack([t + 1, t, 1 - t, 2 - t], axis=1)  # distances to the taps i0-1 .. i0+2
    w = np.where(d <= 1, ((a + 2) * d - (a + 3)) * d * d + 1, ((a * d - 5 * a) * d + 8 * a) * d - 4 * a)
    m = np.zeros((n_out, n_in))
    np.add.at(
        m,
        (np.repeat(np.arange(n_out), 4), np.clip(i0[:, None] + np.arange(-1, 3), 0, n_in - 1).ravel()),
        w.ravel(),
    )
    return m


def resize_posemb(grid: jax.Array, new_hw: tuple[int, int], method: str = 'bilinear') -> jax.Array:
    """Grid posemb [h, w, D] -> [new_h * new_w, D]; identity at the same grid. 'bilinear':
    jax.image.resize (half-pixel centres, antialiased when shrinking); 'bicubic': PyTorch's, as in HF."""
    (h, w, d), new_hw = grid.shape, tuple(new_hw)
    if method == 'bilinear':
        return interpolate_posemb(grid.reshape(-1, d), (h, w), new_hw)
    if method != 'bicubic':
        raise ValueError(f'unknown posemb_resize {method!r}; use bilinear or bicubic')
    if (h, w) == new_hw:
        return grid.reshape(-1, d)
    mh, mw = (_torch_bicubic_matrix(n, m).astype(np.float32) for n, m in zip((h, w), new_hw))
    out = jnp.einsum('ih,jw,hwd->ijd', mh, mw, grid, precision=jax.lax.Precision.HIGHEST)
    return out.reshape(-1, d)


class EncoderBlock(nn.Module):
    """Pre-norm block: x + attn(ln_1(x)); x + mlp(ln_2(x)). Returns (x, None) so nn.scan can carry it."""

    num_heads: int
    mlp_dim: int
    act: str = 'gelu'
    layer_norm_eps: float = 1e-6
    dropout: float = 0.0
    deterministic: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, _=None) -> tuple[jax.Array, None]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        drop = lambda y: nn.Dropout(self.dropout)(y, deterministic=self.deterministic)  # noqa: E731
        y = LayerNorm(epsilon=self.layer_norm_eps, name='ln_1', **kw)(x)
        x = x + drop(Attention(num_heads=self.num_heads, name='attn', **kw)(y))
        y = LayerNorm(epsilon=self.layer_norm_eps, name='ln_2', **kw)(x)
        y = Mlp(self.mlp_dim, act=self.act, dropout=self.dropout, name='mlp', **kw)(
            y, deterministic=self.deterministic
        )
        return nn.with_logical_constraint(x + drop(y), ('batch', 'length', 'act_embed')), None


class Encoder(nn.Module):
    """`depth` EncoderBlocks, optionally nn.scan'ed (`layers` param axis) and/or rematerialised."""

    depth: int
    block: dict  # EncoderBlock kwargs
    scan: bool = False
    remat: str = ''  # models/remat.py: '' / 'none', 'full', 'dots', 'offload' or a jax policy name

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        block_cls = remat.wrap(EncoderBlock, self.remat, scan=self.scan)
        if self.scan:
            block_cls = nn.scan(
                block_cls,
                variable_axes={'params': 0},
                split_rngs={'params': True, 'dropout': True},
                length=self.depth,
                metadata_params={nn.PARTITION_NAME: 'layers'},
            )
            return block_cls(**self.block, name='blocks')(x)[0]
        for i in range(self.depth):
            x, _ = block_cls(**self.block, name=f'block_{i}')(x)
        return x


class MAPHead(nn.Module):
    """Multihead attention pooling with one learned probe (big_vision / SigLIP)."""

    num_heads: int
    mlp_dim: int
    act: str = 'gelu'
    layer_norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        probe = self.param(
            'probe',
            nn.with_logical_partitioning(nn.initializers.xavier_uniform(), (None, 'embed')),
            (1, x.shape[-1]),
            self.param_dtype,
        )
        probe = jnp.broadcast_to(probe.astype(self.dtype), (x.shape[0], 1, x.shape[-1]))
        x = Attention(num_heads=self.num_heads, name='attn', **kw)(probe, x)
        y = LayerNorm(epsilon=self.layer_norm_eps, name='ln', **kw)(x)
        return (x + Mlp(self.mlp_dim, act=self.act, name='mlp', **kw)(y))[:, 0]


class ViT(nn.Module):
    """images [B, H, W, C] in [-1, 1] -> (out, aux); aux = {tokens [B, T, D], patches [B, N, D], pooled [B, D],
    logits [B, classes]}.

    tokens is the encoder output (class token first, if any) after encoder_norm where final_norm='all':
    HF's last_hidden_state; patches drops the class token. out is logits if num_classes else pooled
    (patches for pool='none'). H and W must be multiples of patch_size; a learned posemb is resized
    (`posemb_resize`) when the apply-time grid differs from init.
    CLIP import folds CLIP's class-token position row into `cls`: the two are only ever summed, and HF
    never resizes that row, so the fold is exact at every resolution and needs no extra parameter.
    """

    patch_size: int = 16
    pixels: str = 'signed'  # the tower's input statistics: a PIXELS preset (signed | clip | imagenet)
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int | None = None  # None: 4 * width
    num_classes: int = 0  # 0: no head
    pool: str = 'gap'  # gap | cls | map | none
    class_token: bool = False
    posemb: str = 'learn'  # learn | sincos2d
    posemb_resize: str = 'bilinear'  # bilinear | bicubic (PyTorch/HF interpolate_pos_encoding)
    patch_bias: bool = True  # False: CLIP's bias-free patch conv
    pre_norm: bool = False
    final_norm: str = 'all'  # all: encoder_norm on every token | pooled: on the pooled vector only (CLIP)
    act: str = 'gelu'
    layer_norm_eps: float = 1e-6
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan: bool = False
    remat: str = ''
    head_zero_init: bool = True

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
        p, d = self.patch_size, self.width
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        _, H, W, _ = images.shape
        assert H % p == 0 and W % p == 0, f'image size {(H, W)} not divisible by patch size {p}'
        assert self.pool != 'cls' or self.class_token, "pool='cls' needs class_token=True"
        assert self.pool != 'none' or not self.num_classes, "pool='none' has no head"
        assert self.final_norm in ('all', 'pooled'), f'unknown final_norm {self.final_norm!r}'
        assert self.pool != 'none' or self.final_norm == 'all', "final_norm='pooled' needs a pool"
        gh, gw = H // p, W // p

        # Patch embedding == stride-p conv; conv kernel [p, p, C, D] reshapes to [p*p*C, D].
        images = renormalise(images, self.pixels)
        x = einops.rearrange(images.astype(self.dtype), 'b (h p1) (w p2) c -> b (h w) (p1 p2 c)', p1=p, p2=p)
        x = dense(d, ('patch', 'embed'), use_bias=self.patch_bias, name='embedding', **kw)(x)
        if self.posemb == 'learn':
            if self.has_variable(
                'params', 'pos_embedding'
            ):  # apply: stored grid may differ from this input's
                pe = nn.unbox(self.get_variable('params', 'pos_embedding'))
            else:
                pe = self.param(
                    'pos_embedding',
                    nn.with_logical_partitioning(
                        nn.initializers.normal(stddev=d**-0.5), (None, None, 'embed')
                    ),
                    (gh, gw, d),
                    self.param_dtype,
                )
            pe = resize_posemb(pe, (gh, gw), self.posemb_resize)
        elif self.posemb == 'sincos2d':
            pe = sincos2d_posemb(gh, gw, d)
        else:
            raise ValueError(f'unknown posemb {self.posemb!r}')
        x = x + pe.astype(self.dtype)[None]
        if self.class_token:
            cls = self.param(
                'cls',
                nn.with_logical_partitioning(nn.initializers.zeros, (None, 'embed')),
                (1, d),
                self.param_dtype,
            )
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (x.shape[0], 1, d)), x], axis=1)
        if self.pre_norm:
            x = LayerNorm(epsilon=self.layer_norm_eps, name='ln_pre', **kw)(x)
        x = nn.with_logical_constraint(x, ('batch', 'length', 'act_embed'))
        x = nn.Dropout(self.dropout)(x, deterministic=not train)

        block = dict(
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim or 4 * d,
            act=self.act,
            layer_norm_eps=self.layer_norm_eps,
            dropout=self.dropout,
            deterministic=not train,
            **kw,
        )
        x = Encoder(self.depth, block, scan=self.scan, remat=self.remat, name='encoder')(x)
        norm = LayerNorm(epsilon=self.layer_norm_eps, name='encoder_norm', **kw)
        if self.final_norm == 'all':
            x = norm(x)

        aux = {'tokens': x, 'patches': x[:, int(self.class_token) :]}
        if self.pool == 'gap':
            aux['pooled'] = aux['patches'].mean(axis=1)
        elif self.pool == 'cls':
            aux['pooled'] = x[:, 0]
        elif self.pool == 'map':
            aux['pooled'] = MAPHead(
                self.num_heads,
                self.mlp_dim or 4 * d,
                act=self.act,
                layer_norm_eps=self.layer_norm_eps,
                name='map_head',
                **kw,
            )(aux['patches'])
        elif self.pool != 'none':
            raise ValueError(f'unknown pool {self.pool!r}')
        if self.final_norm == 'pooled':
            aux['pooled'] = norm(aux['pooled'])
        if self.pool == 'none':
            return aux['patches'], aux
        if self.num_classes:
            kinit = nn.initializers.zeros if self.head_zero_init else nn.initializers.lecun_normal()
            aux['logits'] = dense(self.num_classes, ('embed', 'vocab'), kernel_init=kinit, name='head', **kw)(
                aux['pooled']
            )
            return aux['logits'], aux
        return aux['pooled'], aux
