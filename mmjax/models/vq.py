"""UniCode's VQ image tokenizer: a convolutional encoder, a stacked quantizer over a codebook it
is handed, and a decoder (NHWC, images in [-1, 1]).

The encoder and decoder are latent diffusion's (mmjax/models/autoencoder_kl.py: resnet blocks,
stride-2 downsampling, nearest-x2 upsampling) with a 1x1 `quant_conv` from `latent_channels` to
the quantizer's feature width and a 1x1 `post_quant_conv` back. The codebook [K, E] (E = the
LLM's width) is an argument, not a parameter here: UniCode's recipe decides whose it is (the
EMA codebook, the LLM's table, or a shared one).

Shapes, for images [B, S, S, 3] and f = 2^(levels - 1), h = w = S / f, D = `depth`:
  features       [B, h, w, D*E] ('concat') or [B, h, w, E] ('cumsum')
  codes          [B, h, w, D] int32 (code indices, not token ids)
  aggregated     [B, h, w, D*E] ('concat': the D codes side by side) or [B, h, w, E] ('cumsum':
                 their sum, residual style), what the decoder reads
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.autoencoder_kl import _conv, encoder_decoder
from mmjax.objectives import quantization as Q

AGGREGATES = ("concat", "cumsum")


class VQTokenizer(nn.Module):
    code_width: int  # E, the LLM's embedding width
    depth: int = 1  # D codes per position
    aggregate: str = "concat"
    block_out_channels: Sequence[int] = (64, 128, 128)
    layers_per_block: int = 1
    latent_channels: int = 32
    norm_num_groups: int = 32
    mid_block_add_attention: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"aggregate={self.aggregate!r}; choose from {', '.join(AGGREGATES)}")
        if self.depth < 1:
            raise ValueError(f"depth={self.depth}: at least one code per position")
        super().__post_init__()

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def feature_width(self) -> int:
        return self.code_width * (self.depth if self.aggregate == "concat" else 1)

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder, self.decoder = encoder_decoder(self, self.latent_channels, 3)
        self.quant_conv = _conv(self.feature_width, 1, "quant_conv", wide=False, **kw)
        self.post_quant_conv = _conv(self.latent_channels, 1, "post_quant_conv", wide=False, **kw)

    def features(self, images: jax.Array) -> jax.Array:
        """Images [B, S, S, 3] -> the quantizer's inputs [B, h, w, feature_width], float32."""
        return self.quant_conv(self.encoder(images)).astype(jnp.float32)

    def quantize(self, z: jax.Array, codebook: jax.Array, chunk: int = 0):
        """`quantization.quantize_stacked` with this tokenizer's depth and aggregation."""
        return Q.quantize_stacked(z, codebook, self.depth, self.aggregate, chunk)

    def embed_codes(self, codes: jax.Array, codebook: jax.Array) -> jax.Array:
        """Codes [..., D] -> their aggregated embedding (what `quantize` gives for them)."""
        q = codebook[codes].astype(jnp.float32)
        return q.reshape(*codes.shape[:-1], -1) if self.aggregate == "concat" else q.sum(-2)

    def decode(self, aggregated: jax.Array) -> jax.Array:
        """Aggregated embeddings [B, h, w, feature_width] -> images [B, S, S, 3], float32."""
        return self.decoder(self.post_quant_conv(aggregated.astype(self.dtype))).astype(jnp.float32)

    def __call__(self, images: jax.Array, codebook: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(reconstruction, codes) of images through `codebook`."""
        agg, codes, _, _ = self.quantize(self.features(images), codebook)
        return self.decode(agg), codes
