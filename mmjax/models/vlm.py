"""Vision-language model (MM1): vision tower -> connector -> decoder LLM.

Text carries `image_token_id` placeholders, `num_tokens` per image (the connector's output
count); the images of a row are encoded in order and their tokens replace the placeholders in
order (the n-th placeholder of a row takes visual token n). A packed row holds a fixed number
of image slots [B, K, H, W, 3]; slots without a placeholder are computed and ignored.

Param tree: vision/... (ViT), connector/..., llm/... (LLM; `config.init` can load each from
`mmjax convert hf-import` folders with into='vision' / into='llm').
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import connectors
from mmjax.models.llm import LLM
from mmjax.models.vit import ViT


def splice(text: jax.Array, visual: jax.Array, is_image: jax.Array) -> jax.Array:
    """text [B, L, D], visual [B, N, D], is_image [B, L] -> [B, L, D]: the n-th True position of a
    row takes visual[n]."""
    rank = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, visual.shape[1] - 1)
    gathered = jnp.take_along_axis(visual, rank[..., None], axis=1)
    return jnp.where(is_image[..., None], gathered.astype(text.dtype), text)


class VLM(nn.Module):
    """tokens [B, L] + images [B, K, H, W, 3] (floats in [-1, 1]) -> (logits, LLM aux)."""

    vision: ViT  # pool='none': returns the patch tokens
    connector: nn.Module  # patches [N, P, Dv] -> [N, num_tokens, D_llm]
    llm: LLM
    image_token_id: int

    def encode_images(self, images: jax.Array) -> jax.Array:
        """images [..., H, W, 3] -> visual tokens [..., num_tokens, D_llm]."""
        lead = images.shape[:-3]
        patches, _ = self.vision(images.reshape(-1, *images.shape[-3:]))
        tokens = self.connector(patches)
        return tokens.reshape(*lead, *tokens.shape[1:])

    def embed(self, tokens: jax.Array, images: jax.Array) -> jax.Array:
        """The LLM input embeddings [B, L, D] with the images spliced in at their placeholders."""
        visual = self.encode_images(images)  # [B, K, T, D]
        visual = visual.reshape(visual.shape[0], -1, visual.shape[-1])
        text = self.llm.embed(tokens)
        x = splice(text, visual, tokens == self.image_token_id)
        return nn.with_logical_constraint(x, ('batch', 'length', 'act_embed'))

    def __call__(self, tokens: jax.Array, images: jax.Array, **llm_kwargs):
        return self.llm(embeddings=self.embed(tokens, images), **llm_kwargs)


def build(mc, vocab_size: int, image_token_id: int) -> VLM:
    """The VLM a model config describes (`model` of configs/mm1.py: vision, connector, llm, dtype,
    scan, remat). Raises ValueError / TypeError naming a bad entry."""
    common = dict(dtype=jnp.dtype(mc["dtype"]), scan=mc["scan"], remat=mc["remat"])
    vision = {k: v for k, v in dict(mc["vision"]).items() if k != "posemb_size"}
    llm = {k: v for k, v in dict(mc["llm"]).items() if k != "vocab_size"}
    moe = llm.pop("moe", None)
    if moe and moe.get("num_experts"):
        llm["moe"] = dict(moe)
    conn = dict(mc["connector"])
    kind = conn.pop("kind")
    return VLM(
        vision=ViT(**vision, pool="none", **common),
        connector=connectors.build(kind, out_dim=llm["width"], dtype=common["dtype"], **conn),
        llm=LLM(vocab_size=vocab_size, **llm, **common),
        image_token_id=image_token_id,
    )
