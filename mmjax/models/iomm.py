"""The IOMM model: a frozen VLM turns a condition sequence into the hidden states that condition
a flow-matching generator (the MM-DiT).

The sequence is the VLM's input embeddings: text tokens with the reference image's visual tokens
spliced in at its `<image>` placeholders (`c = concat(c_aux, c_img)` for image-only training, a
prompt for text-to-image, an instruction and the image for editing). Masked image modelling
zeroes visual tokens (training only). The adapter then adds tokens: RQA appends N queries that
cross-attended over `c`; the MetaQuery baseline appends N fixed queries. The LLM reads the whole
sequence with its padding mask; RQA hands the generator every hidden state, MetaQuery only those
at the query positions, through its connector.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import metaquery
from mmjax.models.rqa import RQA
from mmjax.models.vlm import VLM

ADAPTERS = ("rqa", "metaquery")


def mask_image_tokens(rng, c: jax.Array, is_image: jax.Array, ratio: float, per_element: bool = False):
    """Masked image modelling: zero each visual token of c [B, L, D] (is_image [B, L]) with
    probability `ratio` (each element of it, with per_element); text tokens are never touched."""
    shape = c.shape if per_element else c.shape[:2]
    drop = jax.random.bernoulli(rng, ratio, shape)
    drop = (drop if per_element else drop[..., None]) & is_image[..., None]
    return jnp.where(drop, jnp.zeros_like(c), c)


class IOMM(nn.Module):
    """The frozen MLLM (`mllm`), the adapter (`rqa`; or `queries` and `connector` for MetaQuery) and
    the generator (`generator`).

    `condition(tokens [B, L], mask [B, L], images [B, K, H, W, 3] in [-1, 1])` -> (h [B, T, D], mask [B, T]);
    `velocity(x_t, t, h, mask)` -> the generator's velocity, x_t's shape; `to_target(images)` /
    `from_target(x)`: images <-> the generator's space (the frozen `vae`'s latents, or pixels).
    """

    mllm: VLM
    generator: nn.Module  # MMDiT: (x, t, cond, cond_mask, pooled) -> v
    vae: nn.Module | None = None  # AutoencoderKL (frozen): the generator works on its latents
    adapter: str = "rqa"
    num_queries: int = 64
    num_heads: int = 4
    mlp_ratio: float = 4.0
    connector_depth: int = 2  # MetaQuery's connector
    pooled: bool = True  # the generator also gets the masked mean of h
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        if self.adapter not in ADAPTERS:
            raise ValueError(f"adapter {self.adapter!r}: choose one of {', '.join(ADAPTERS)}")
        if self.adapter == "rqa":
            self.rqa = RQA(self.num_queries, self.num_heads, self.mlp_ratio, dtype=self.dtype)
        else:
            self.queries = metaquery.Queries(self.num_queries)
            width = self.mllm.llm.width
            self.connector = metaquery.Connector(
                width, self.connector_depth, self.num_heads, dtype=self.dtype
            )

    def condition(self, tokens, mask, images, *, mim_rng=None, mim_ratio=0.0, per_element=False):
        c = self.mllm.embed(tokens, images)
        if mim_rng is not None and mim_ratio > 0:
            c = mask_image_tokens(mim_rng, c, tokens == self.mllm.image_token_id, mim_ratio, per_element)
        c, m = (self.rqa if self.adapter == "rqa" else self.queries)(c, mask)
        positions = jnp.maximum(jnp.cumsum(m, axis=1) - 1, 0)  # contiguous over real tokens
        _, aux = self.mllm.llm(embeddings=c, positions=positions, attention_mask=m)
        h = aux["hidden"]
        if self.adapter == "rqa":
            return h, m
        h = self.connector(h[:, -self.num_queries :])
        return h, jnp.ones(h.shape[:2], bool)

    def velocity(self, x, t, h, mask):
        pooled = None
        if self.pooled:
            w = mask[..., None].astype(h.dtype)
            pooled = (h * w).sum(1) / jnp.maximum(w.sum(1), 1.0)
        return self.generator(x, t, h, mask, pooled)

    def to_target(self, images):
        """Images [B, H, W, 3] in [-1, 1] -> what the generator makes (the VAE's latents, or pixels)."""
        return images if self.vae is None else self.vae.to_latent(images)

    def from_target(self, x):
        return x if self.vae is None else self.vae.from_latent(x)

    def __call__(self, tokens, mask, refs, images, t):
        """For init: refs [B, K, h, w, 3] as the MLLM reads them, target images [B, H, W, 3]."""
        x = self.to_target(images)
        if self.vae is not None:
            self.vae(images)  # creates the decoder's parameters too
        return self.velocity(x, t, *self.condition(tokens, mask, refs))
