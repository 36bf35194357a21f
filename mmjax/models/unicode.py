"""UniCode (arXiv 2403.09072): a VQ tokenizer whose codes are the LLM's token ids, and the LLM.

Parameters:
  vq/...              the tokenizer (mmjax/models/vq.py)
  llm/...             the decoder LLM; llm/embedder/embedding [V, E] is the unified table
  connector           Dense, aggregated code embedding (D*E or E) -> E: how the LLM reads an image's
                      h x w compressed embeddings (image -> text, and the decompression task)
  codebook [K, E]     the tokenizer's codebook, kept equal to its LLM rows' blend by the recipe
  token_ids [K]       int32, code k is LLM token token_ids[k]; -1 until the recipe fixes the map
`codebook` and `token_ids` are written by the recipe (`constrain`), never by the optimizer.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.layers import dense
from mmjax.models.llm import LLM
from mmjax.models.vq import VQTokenizer


def code_token_ids(table: jax.Array, num_codes: int, exclude: Sequence[int] = ()) -> jax.Array:
    """The code -> token-id map: all rows when the codebook is the table's size, else the
    `num_codes` rows of largest L2 norm (UniCode's fixed subset) other than `exclude` (special
    tokens: a code is never BOS, EOS or a marker), in increasing id order."""
    if num_codes == table.shape[0] and not exclude:
        return jnp.arange(num_codes, dtype=jnp.int32)
    if num_codes > table.shape[0] - len(set(exclude)):
        raise ValueError(
            f"{num_codes} codes do not fit a {table.shape[0]}-token table less {len(exclude)} special tokens"
        )
    norms = jnp.sum(table.astype(jnp.float32) ** 2, -1)
    norms = norms.at[jnp.asarray(exclude, jnp.int32)].set(-jnp.inf) if exclude else norms
    return jnp.sort(jax.lax.top_k(norms, num_codes)[1]).astype(jnp.int32)


class UniCode(nn.Module):
    vq: VQTokenizer
    llm: LLM
    num_codes: int

    def __post_init__(self):
        if self.num_codes > self.llm.vocab_size:
            raise ValueError(f"num_codes={self.num_codes} > the LLM's vocabulary ({self.llm.vocab_size})")
        super().__post_init__()

    def setup(self):
        E = self.llm.width
        self.connector = dense(E, (None, "embed"), name="connector", dtype=self.llm.dtype)
        self.codebook = self.param(
            "codebook",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
            (self.num_codes, E),
        )
        self.token_ids = self.param(
            "token_ids",
            nn.with_logical_partitioning(lambda _, shape: jnp.full(shape, -1, jnp.int32), (None,)),
            (self.num_codes,),
        )

    def image_inputs(self, aggregated: jax.Array) -> jax.Array:
        """Aggregated embeddings [B, h, w, F] -> the LLM's image inputs [B, h*w, E]."""
        return self.connector(aggregated.reshape(aggregated.shape[0], -1, aggregated.shape[-1]))

    def embed(self, tokens: jax.Array) -> jax.Array:
        return self.llm.embed(tokens)

    def lm(self, embeddings: jax.Array, mask: jax.Array, return_hidden: bool = False) -> jax.Array:
        """Logits [B, T, V] of input embeddings [B, T, E] (padding keys masked); with return_hidden,
        the final-normed hidden states [B, T, E] that `logits` maps to them."""
        return self.llm(embeddings=embeddings, attention_mask=mask, return_hidden=return_hidden)[0]

    def logits(self, h: jax.Array) -> jax.Array:
        return self.llm.logits(h)

    def __call__(self, images: jax.Array, tokens: jax.Array):
        """Touches every parameter (what `init` runs): reconstruction and logits."""
        agg, _, _, _ = self.vq.quantize(self.vq.features(images), self.codebook)
        x = jnp.concatenate([self.image_inputs(agg), self.embed(tokens)], 1)
        return self.vq.decode(agg), self.lm(x, jnp.ones(x.shape[:2], bool)), self.token_ids
