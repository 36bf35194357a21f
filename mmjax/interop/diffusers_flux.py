"""diffusers `FluxTransformer2DModel` weights -> the mmjax MMDiT (exact: same forward, fp32 to ~1e-6).

`to_mmjax(flux_config, tensors)` takes the model's config dict (`model.config` / config.json) and its
state dict as numpy arrays, and returns (params in the unscanned layout, MMDiT kwargs).

  x_embedder / context_embedder / proj_out                -> same names ({kernel = W.T, bias})
  time_text_embed.timestep_embedder.linear_{1,2}           -> time_embedder/{wi, wo}
  time_text_embed.text_embedder.linear_{1,2}               -> pooled_embedder/{wi, wo}
  transformer_blocks.i.norm1{,_context}.linear [6D, D]     -> double_blocks/block_i/{img,txt}_mod [D, 6, D]
  transformer_blocks.i.attn.to_{q,k,v}, norm_{q,k}         -> .../img_attn/{q,k,v [D, H, hd], {q,k}_norm}
  transformer_blocks.i.attn.add_{q,k,v}_proj, norm_added_* -> .../txt_attn/...
  transformer_blocks.i.attn.to_out.0 / to_add_out          -> .../{img,txt}_attn/out [H, hd, D]
  transformer_blocks.i.ff{,_context}.net.{0.proj,2}        -> .../{img,txt}_mlp/{wi, wo}
  single_transformer_blocks.i.norm.linear [3D, D]          -> single_blocks/block_i/mod [D, 3, D]
  single_transformer_blocks.i.attn.to_{q,k,v}, norm_{q,k}  -> .../attn/...
  single_transformer_blocks.i.proj_mlp                     -> .../mlp/wi
  single_transformer_blocks.i.proj_out [D, D + F]          -> .../attn/out (columns :D, no bias), mlp/wo (D:, bias)
  norm_out.linear [2D, D] (scale, shift)                   -> final_mod [D, 2, D]

Calling conventions (what makes the outputs equal):
  - diffusers' `hidden_states` [B, h*w, C] are the packed latent tokens in row-major order; mmjax takes
    them as x [B, h, w, C] (patch_size=1, in_channels=C; FLUX packs its 2x2 latent patches outside).
  - `img_ids` [h*w, 3] = (0, row, col), `txt_ids` = zeros, as the FLUX pipelines build them: the first
    rope axis is then always at position 0 (never rotated), so rope_axes = axes_dims_rope[1:].
  - `timestep` = t in [0, 1] (diffusers multiplies by 1000 inside, as mmjax does);
    `pooled_projections` = pooled; no guidance embedder (guidance_embeds=False).
  - FLUX attends to every condition token; mmjax's cond_mask=None (or all True) is the same.
"""

from __future__ import annotations

import jax
import numpy as np

from mmjax import tree
from mmjax.interop import ConversionError

DEFAULTS = dict(  # FluxTransformer2DModel.__init__ defaults, for configs that omit fields
    patch_size=1,
    in_channels=64,
    out_channels=None,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=False,
    axes_dims_rope=(16, 56, 56),
)


def mmdit_kwargs(flux_config: dict) -> dict:
    """MMDiT kwargs that reproduce the FluxTransformer2DModel described by `flux_config`."""
    c = {**DEFAULTS, **{k: v for k, v in flux_config.items() if k in DEFAULTS}}
    if c["guidance_embeds"]:
        raise ConversionError("guidance_embeds=True (guidance-distilled FLUX) is not supported")
    if c["patch_size"] != 1:
        raise ConversionError(f"patch_size {c['patch_size']}: only 1 (FLUX packs latents outside)")
    if c["out_channels"] not in (None, c["in_channels"]):
        raise ConversionError(f"out_channels {c['out_channels']} != in_channels {c['in_channels']}")
    hd, heads = c["attention_head_dim"], c["num_attention_heads"]
    axes = tuple(c["axes_dims_rope"])
    if sum(axes) != hd or len(axes) not in (2, 3):
        raise ConversionError(f"axes_dims_rope {axes}: needs 2 or 3 axes summing to head dim {hd}")
    return dict(
        width=heads * hd,
        num_heads=heads,
        depth_double=c["num_layers"],
        depth_single=c["num_single_layers"],
        mlp_ratio=4.0,
        patch_size=1,
        in_channels=c["in_channels"],
        cond_dim=c["joint_attention_dim"],
        pooled_dim=c["pooled_projection_dim"],
        positions="rope",
        rope_axes=axes[-2:],
        rope_theta=10_000.0,
        qk_norm=True,
        norm_eps=1e-6,
    )


class _Tensors:
    def __init__(self, tensors: dict[str, np.ndarray]):
        self.left = {k: np.asarray(v) for k, v in tensors.items()}

    def take(self, name: str) -> np.ndarray:
        if name not in self.left:
            raise ConversionError(f"tensor {name!r} is missing from the weights")
        return self.left.pop(name)

    def linear(self, name: str, bias: bool = True) -> dict:
        out = {"kernel": self.take(f"{name}.weight").T}
        if bias:
            out["bias"] = self.take(f"{name}.bias")
        return out

    def mod(self, name: str, n: int) -> dict:
        """Linear [n*D, D] -> DenseGeneral kernel [D, n, D], bias [n, D] (diffusers' chunk order)."""
        w, b = self.take(f"{name}.weight"), self.take(f"{name}.bias")
        return {"kernel": w.T.reshape(w.shape[1], n, -1), "bias": b.reshape(n, -1)}

    def heads(self, name: str, hd: int) -> dict:
        w, b = self.take(f"{name}.weight"), self.take(f"{name}.bias")
        return {"kernel": w.T.reshape(w.shape[1], -1, hd), "bias": b.reshape(-1, hd)}

    def out(self, name: str, hd: int) -> dict:
        w, b = self.take(f"{name}.weight"), self.take(f"{name}.bias")
        return {"kernel": w.T.reshape(-1, hd, w.shape[0]), "bias": b}

    def attn(self, prefix: str, q: str, k: str, v: str, nq: str, nk: str, hd: int) -> dict:
        return {
            "q": self.heads(f"{prefix}.{q}", hd),
            "k": self.heads(f"{prefix}.{k}", hd),
            "v": self.heads(f"{prefix}.{v}", hd),
            "q_norm": {"scale": self.take(f"{prefix}.{nq}.weight")},
            "k_norm": {"scale": self.take(f"{prefix}.{nk}.weight")},
        }


def to_mmjax(flux_config: dict, tensors: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """(MMDiT params, unscanned layout, numpy; MMDiT kwargs) of a FluxTransformer2DModel state dict."""
    kw = mmdit_kwargs(flux_config)
    hd, d = kw["width"] // kw["num_heads"], kw["width"]
    t = _Tensors(tensors)
    params = {
        "x_embedder": t.linear("x_embedder"),
        "context_embedder": t.linear("context_embedder"),
        "time_embedder": {
            "wi": t.linear("time_text_embed.timestep_embedder.linear_1"),
            "wo": t.linear("time_text_embed.timestep_embedder.linear_2"),
        },
        "pooled_embedder": {
            "wi": t.linear("time_text_embed.text_embedder.linear_1"),
            "wo": t.linear("time_text_embed.text_embedder.linear_2"),
        },
    }
    double = {}
    for i in range(kw["depth_double"]):
        n = f"transformer_blocks.{i}"
        img_attn = t.attn(f"{n}.attn", "to_q", "to_k", "to_v", "norm_q", "norm_k", hd)
        txt_attn = t.attn(
            f"{n}.attn", "add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k", hd
        )
        img_attn["out"] = t.out(f"{n}.attn.to_out.0", hd)
        txt_attn["out"] = t.out(f"{n}.attn.to_add_out", hd)
        double[f"block_{i}"] = {
            "img_mod": t.mod(f"{n}.norm1.linear", 6),
            "txt_mod": t.mod(f"{n}.norm1_context.linear", 6),
            "img_attn": img_attn,
            "txt_attn": txt_attn,
            "img_mlp": {"wi": t.linear(f"{n}.ff.net.0.proj"), "wo": t.linear(f"{n}.ff.net.2")},
            "txt_mlp": {
                "wi": t.linear(f"{n}.ff_context.net.0.proj"),
                "wo": t.linear(f"{n}.ff_context.net.2"),
            },
        }
    single = {}
    for i in range(kw["depth_single"]):
        n = f"single_transformer_blocks.{i}"
        attn = t.attn(f"{n}.attn", "to_q", "to_k", "to_v", "norm_q", "norm_k", hd)
        w, b = t.take(f"{n}.proj_out.weight"), t.take(f"{n}.proj_out.bias")  # [D, D + F]
        attn["out"] = {"kernel": w[:, :d].T.reshape(-1, hd, d)}
        single[f"block_{i}"] = {
            "mod": t.mod(f"{n}.norm.linear", 3),
            "attn": attn,
            "mlp": {"wi": t.linear(f"{n}.proj_mlp"), "wo": {"kernel": w[:, d:].T, "bias": b}},
        }
    if double:
        params["double_blocks"] = double
    if single:
        params["single_blocks"] = single
    params["final_mod"] = t.mod("norm_out.linear", 2)
    params["proj_out"] = t.linear("proj_out")
    if t.left:
        raise ConversionError(f"tensors this converter does not know: {sorted(t.left)[:5]}")
    params = jax.tree.map(lambda x: np.ascontiguousarray(x, np.float32), params)
    _check_shapes(params, kw)
    return params, kw


def _check_shapes(params: dict, kw: dict) -> None:
    """Raises unless `params` has exactly the MMDiT's parameter names and shapes."""
    import flax.linen as nn

    from mmjax.models.mmdit import MMDiT

    f32 = np.float32
    args = (
        jax.ShapeDtypeStruct((1, 2, 2, kw["in_channels"]), f32),
        jax.ShapeDtypeStruct((1,), f32),
        jax.ShapeDtypeStruct((1, 1, kw["cond_dim"]), f32),
        None,
        jax.ShapeDtypeStruct((1, kw["pooled_dim"]), f32),
    )
    abstract = nn.unbox(jax.eval_shape(MMDiT(**kw).init, jax.random.key(0), *args)["params"])
    got, want = ({n: tuple(x.shape) for n, x in tree.flat(p).items()} for p in (params, abstract))
    bad = [
        f"{n}: {got.get(n)} in the weights, {want.get(n)} in the model"
        for n in sorted(got.keys() | want.keys())
        if got.get(n) != want.get(n)
    ]
    if bad:
        raise ConversionError(f"the weights do not fit the MMDiT ({len(bad)} mismatches), e.g. {bad[:3]}")
