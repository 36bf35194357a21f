"""MM-GEM (arXiv 2405.19333): one ViT and one decoder LLM that both embed and caption.

- PoolAggregator: the ViT's patch map mean-pooled (whole images) or RoIAligned over boxes
  (regions), then h1 -> the image embedding v (shared space, width `embed_dim`).
- Text embedding: the LLM's last hidden state at each sequence's own `[EMB]` token, through h2.
- Captioning: h3(v) -> `context_tokens` LLM input vectors V_in, then `[CAP]` (or, with
  `soft_prompts` K > 0 and `soft=True`, K learned prompt vectors `[CAP_i]`), then the caption.
- h4: a linear head on v for region retrieval, initialised to the identity.
- `logit_scale`: InfoNCE's learnable log scale, initialised at ln(1/0.07).
Embeddings are returned unnormalised; the objective L2-normalises them.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.layers import dense
from mmjax.models.llm import LLM
from mmjax.models.roi_align import roi_align
from mmjax.models.vit import ViT
from mmjax.objectives.contrastive import LOGIT_SCALE_INIT


def pool_aggregate(
    fmap: jax.Array, boxes: jax.Array | None, image_size: int, output_size: int = 2
) -> jax.Array:
    """PoolAggregator: fmap [B, h, w, C] -> [B, C] mean-pooled, or with boxes [B, 4] (x1, y1, x2, y2
    in input pixels) the mean of each box's RoIAlign bins (aligned, adaptive sampling)."""
    if boxes is None:
        return fmap.mean((1, 2))
    bins = roi_align(fmap, boxes, output_size, fmap.shape[2] / image_size, -1, True, per_image=True)
    return bins.mean((1, 2))


class MMGEM(nn.Module):
    vision: ViT  # pool='none': the patch tokens
    llm: LLM
    embed_dim: int
    emb_id: int
    cap_id: int
    context_tokens: int = 1
    soft_prompts: int = 0  # K learned [CAP_i] (stage 2's region captioning)
    roi_output: int = 2  # RoIAlign bins per side before the mean

    def setup(self):
        kw = dict(dtype=self.llm.dtype)
        self.h1 = dense(self.embed_dim, ("embed", None), name="h1", **kw)
        self.h2 = dense(self.embed_dim, ("embed", None), name="h2", **kw)
        self.h3 = dense((self.context_tokens, self.llm.width), (None, None, "embed"), name="h3", **kw)
        eye = lambda _, shape, dtype: jnp.eye(*shape, dtype=dtype)  # noqa: E731
        self.h4 = dense(self.embed_dim, (None, None), kernel_init=eye, name="h4")
        self.logit_scale = self.param(
            "logit_scale", nn.with_logical_partitioning(nn.initializers.constant(LOGIT_SCALE_INIT), ()), ()
        )
        if self.soft_prompts:
            init = nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed"))
            self.prompts = self.param("soft_prompts", init, (self.soft_prompts, self.llm.width))

    def image_embedding(self, images: jax.Array, boxes: jax.Array | None = None) -> jax.Array:
        """images [B, S, S, 3] in [-1, 1] (+ boxes [B, 4] in pixels) -> v [B, embed_dim]."""
        patches, _ = self.vision(images)
        g = int(round(patches.shape[1] ** 0.5))
        fmap = patches.reshape(patches.shape[0], g, g, patches.shape[-1]).astype(jnp.float32)
        return self.h1(pool_aggregate(fmap, boxes, images.shape[1], self.roi_output)).astype(jnp.float32)

    def region_head(self, v: jax.Array) -> jax.Array:
        return self.h4(v).astype(jnp.float32)

    def text_embedding(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        """tokens [B, T] holding one `[EMB]` each, mask [B, T] (real tokens; padding on either side)
        -> t [B, embed_dim]: h2 of the last hidden state at that row's `[EMB]`."""
        positions = jnp.maximum(jnp.cumsum(mask, 1) - 1, 0)
        _, aux = self.llm(tokens, positions=positions, attention_mask=mask)
        at = jnp.argmax(tokens == self.emb_id, axis=1)
        h = jnp.take_along_axis(aux["hidden"], at[:, None, None], axis=1)[:, 0]
        return self.h2(h).astype(jnp.float32)

    def caption_prompt(self, v: jax.Array, soft: bool = False) -> jax.Array:
        """[V_in, [CAP]] (or [V_in, CAP_1..CAP_K] when soft) as LLM input embeddings [B, n + P, D]."""
        context = self.h3(v.astype(self.llm.dtype))
        if soft:
            prompts = jnp.broadcast_to(self.prompts, (len(v), *self.prompts.shape))
        else:
            prompts = self.llm.embed(jnp.full((len(v), 1), self.cap_id, jnp.int32))
        return jnp.concatenate([context, prompts.astype(context.dtype)], 1)

    def caption_logits(
        self, v: jax.Array, targets: jax.Array, soft: bool = False, return_hidden: bool = False
    ) -> jax.Array:
        """Teacher-forced logits [B, T, V] for the caption targets [B, T] (text, EOS, padding); with
        return_hidden, the final-normed hidden states [B, T, D] that `logits` maps to them."""
        prompt = self.caption_prompt(v, soft)
        x = jnp.concatenate([prompt, self.llm.embed(targets).astype(prompt.dtype)], 1)
        out, _ = self.llm(embeddings=x, return_hidden=return_hidden)
        n = prompt.shape[1]
        return out[:, n - 1 : n - 1 + targets.shape[1]]

    def logits(self, h: jax.Array) -> jax.Array:
        return self.llm.logits(h)

    def __call__(self, images, boxes, tokens, mask, targets):
        """Every path once (init)."""
        v = self.image_embedding(images)
        r = self.region_head(self.image_embedding(images, boxes))
        t = self.text_embedding(tokens, mask)
        logits = self.caption_logits(v, targets, soft=bool(self.soft_prompts))
        return v, r, t, logits, self.logit_scale


def build(mc, vocab_size: int, emb_id: int, cap_id: int) -> MMGEM:
    """The model a config's `model` describes (vision, llm, embed_dim, context_tokens, soft_prompts,
    dtype, scan, remat). Raises TypeError / ValueError naming a bad entry."""
    common = dict(dtype=jnp.dtype(mc["dtype"]), scan=mc["scan"], remat=mc["remat"])
    llm = {k: v for k, v in dict(mc["llm"]).items() if k != "vocab_size"}
    return MMGEM(
        vision=ViT(**dict(mc["vision"]), pool="none", **common),
        llm=LLM(vocab_size=vocab_size, **llm, **common),
        embed_dim=mc["embed_dim"],
        emb_id=emb_id,
        cap_id=cap_id,
        context_tokens=mc["context_tokens"],
        soft_prompts=mc["soft_prompts"],
    )
