"""Vision-language model (MM1): vision tower -> connector -> decoder LLM.

Text carries `image_token_id` placeholders, `num_tokens` per image (the connector's output
count); the images of a row are encoded in order and their tokens replace the placeholders in
order (the n-th placeholder of a row takes visual token n). A packed row holds a fixed number
of image slots [B, K, H, W, 3]; slots without a placeholder are ignored. Given which slots hold an
image (`image_valid` [B, K], e.g. the packer's `images_segment_ids` > 0) and a budget `max_images`
per batch, only the real images are encoded (`encode_slots`).

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
    max_images: int = 0  # images encoded per batch when the valid slots are known; 0: every slot

    def encode_images(self, images: jax.Array) -> jax.Array:
        """images [..., H, W, 3] -> visual tokens [..., num_tokens, D_llm]."""
        lead = images.shape[:-3]
        patches, _ = self.vision(images.reshape(-1, *images.shape[-3:]))
        tokens = self.connector(patches)
        return tokens.reshape(*lead, *tokens.shape[1:])

    def encode_slots(self, images: jax.Array, valid: jax.Array | None = None) -> jax.Array:
        """images [B, K, H, W, 3] -> [B, K, num_tokens, D]. With `valid` [B, K] and `max_images`, the
        valid slots are gathered into a static budget, split evenly over the batch's shards (the
        gather stays on each device), and only those are encoded; empty slots read 0. A batch with
        more valid slots than a shard's budget encodes every slot (lax.cond: same values)."""
        B, K = images.shape[:2]
        if valid is None or self.max_images <= 0 or self.max_images >= B * K:
            return self.encode_images(images)
        G = _batch_shards(B)
        per, budget = B * K // G, -(-self.max_images // G)
        flat = images.reshape(G, per, *images.shape[2:])
        valid = valid.reshape(G, per)
        idx = jax.vmap(lambda v: jnp.nonzero(v, size=budget, fill_value=per)[0])(valid)  # [G, budget]

        def gathered(m, flat, idx):
            picked = jax.vmap(lambda x, i: jnp.take(x, i, axis=0, mode="fill", fill_value=0))(flat, idx)
            enc = m.encode_images(picked)  # [G, budget, T, D]
            out = jnp.zeros((G, per, *enc.shape[2:]), enc.dtype)
            out = jax.vmap(lambda o, i, e: o.at[i].set(e, mode="drop"))(out, idx, enc)
            return out.reshape(B, K, *enc.shape[2:])

        def every(m, flat, idx):
            return m.encode_images(flat.reshape(images.shape))

        if self.is_initializing():
            return every(self, flat, idx)
        fits = jnp.all(valid.sum(1) <= budget)
        return nn.cond(fits, gathered, every, self, flat, idx)

    def embed(self, tokens: jax.Array, images: jax.Array, image_valid: jax.Array | None = None) -> jax.Array:
        """The LLM input embeddings [B, L, D] with the images spliced in at their placeholders."""
        visual = self.encode_slots(images, image_valid)  # [B, K, T, D]
        visual = visual.reshape(visual.shape[0], -1, visual.shape[-1])
        text = self.llm.embed(tokens)
        x = splice(text, visual, tokens == self.image_token_id)
        return nn.with_logical_constraint(x, ('batch', 'length', 'act_embed'))

    def logits(self, h: jax.Array) -> jax.Array:
        """The LM head of final-normed hidden states (`return_hidden=True` calls)."""
        return self.llm.logits(h)

    def __call__(
        self, tokens: jax.Array, images: jax.Array, image_valid: jax.Array | None = None, **llm_kwargs
    ):
        return self.llm(embeddings=self.embed(tokens, images, image_valid), **llm_kwargs)


def _batch_shards(batch: int) -> int:
    """How many shards the mesh (if any) cuts the logical 'batch' axis into (1 without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    axes = nn.logical_to_mesh_axes(("batch",))[0]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    n = 1
    for a in axes:
        n *= mesh.shape[a]
    return n if batch % n == 0 else 1


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
        max_images=mc.get("max_images", 0),
    )
