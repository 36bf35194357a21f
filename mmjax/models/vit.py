"""Vision Transformer (big_vision / CLIP / SigLIP style) on the shared layers.

Param tree (scan=False; scan=True replaces block_{i} by one `blocks` subtree whose leaves have a
leading `layers` axis of size depth):
  embedding/{kernel [p*p*C, D], bias}      patch projection; kernel rows flattened as (p1 p2 c)
  cls [1, D]                                class_token=True only
  pos_embedding [gh, gw, D]                 posemb='learn' only (grid of the init resolution)
  ln_pre/{scale, bias}                      pre_norm=True only
  encoder/block_{i}/{ln_1, attn/{q,k,v,out}, ln_2, mlp/{wi,wo}}
  encoder_norm/{scale, bias}
  map_head/{probe [1, D], attn, ln, mlp}    pool='map' only
  head/{kernel [D, num_classes], bias}      num_classes > 0 only
"""

from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.layers import Attention, LayerNorm, Mlp, dense, interpolate_posemb, sincos2d_posemb

Dtype = Any


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
    remat: str = ''  # '' or a jax.checkpoint_policies name, e.g. 'nothing_saveable'

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        block_cls = EncoderBlock
        if self.remat:
            block_cls = nn.remat(
                block_cls, policy=getattr(jax.checkpoint_policies, self.remat), prevent_cse=not self.scan
            )
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
    """images [B, H, W, C] -> (out, aux); aux = {patches [B, N, D], pooled [B, D], logits [B, classes]}.

    out is logits if num_classes else pooled (patches for pool='none'). H and W must be multiples of
    patch_size; a learned posemb is bilinearly resized when the apply-time grid differs from init.
    CLIP import: fold CLIP's class-token position row into `cls` (posemb here covers patches only).
    """

    patch_size: int = 16
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int | None = None  # None: 4 * width
    num_classes: int = 0  # 0: no head
    pool: str = 'gap'  # gap | cls | map | none
    class_token: bool = False
    posemb: str = 'learn'  # learn | sincos2d
    pre_norm: bool = False
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
        gh, gw = H // p, W // p

        # Patch embedding == stride-p conv; conv kernel [p, p, C, D] reshapes to [p*p*C, D].
        x = einops.rearrange(images.astype(self.dtype), 'b (h p1) (w p2) c -> b (h w) (p1 p2 c)', p1=p, p2=p)
        x = dense(d, ('patch', 'embed'), name='embedding', **kw)(x)
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
            pe = interpolate_posemb(pe.reshape(-1, d), pe.shape[:2], (gh, gw))
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
        x = LayerNorm(epsilon=self.layer_norm_eps, name='encoder_norm', **kw)(x)

        aux = {'patches': x[:, int(self.class_token) :]}
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
        if self.pool == 'none':
            return aux['patches'], aux
        if self.num_classes:
            kinit = nn.initializers.zeros if self.head_zero_init else nn.initializers.lecun_normal()
            aux['logits'] = dense(self.num_classes, ('embed', 'vocab'), kernel_init=kinit, name='head', **kw)(
                aux['pooled']
            )
            return aux['logits'], aux
        return aux['pooled'], aux
