"""CLIP and SigLIP vision towers (Hugging Face transformers) -> the mmjax ViT (import only).

Takes a full CLIPModel / SiglipModel folder (its `vision_config`, tensors under `vision_model.`) or a
vision-only CLIPVisionModel / SiglipVisionModel folder (tensors unprefixed, as transformers 5 saves
them, or under `vision_model.`, as 4.x did). The CLIP/SigLIP text tower, the projection heads and the
logit scale/bias are not imported. Config defaults come from transformers' config classes, so a
config.json that lists only non-default values reads right.

  embeddings.patch_embedding [D, C, p, p] (+ bias)   -> embedding/{kernel [p*p*C, D] rows (p1 p2 c), bias}
  embeddings.position_embedding [(1+)g*g, D]         -> pos_embedding [g, g, D]
  embeddings.class_embedding + position row 0 (CLIP) -> cls [1, D]  (exact: HF never resizes that row)
  pre_layrnorm (CLIP) / post_layernorm               -> ln_pre / encoder_norm
  encoder.layers.i.{layer_norm1, layer_norm2}        -> encoder/block_i/{ln_1, ln_2}
  encoder.layers.i.self_attn.{q,k,v,out}_proj        -> encoder/block_i/attn/{q,k,v,out}
  encoder.layers.i.mlp.{fc1, fc2}                    -> encoder/block_i/mlp/{wi, wo}
  head.{probe, attention, layernorm, mlp} (SigLIP)   -> map_head/{probe, attn/{q,k,v,out}, ln, mlp}
q/k/v kernels are [embed, heads, kv], out is [heads, kv, embed]. The ViT matches HF's forward:
aux['tokens'] = last_hidden_state, aux['pooled'] = pooler_output; at other resolutions it resizes
the position grid with PyTorch's bicubic kernel, as HF's `interpolate_pos_encoding=True`.
"""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import numpy as np

from mmjax import tree
from mmjax.interop import ConversionError
from mmjax.models.vit import PIXELS, ViT

MODEL_TYPES = ("clip", "clip_vision_model", "siglip", "siglip_vision_model")
ACTIVATIONS = {
    "quick_gelu": "quick_gelu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
}


def vision_config(hf_config: dict) -> dict:
    """The vision config of a CLIP/SigLIP (vision) config.json, with transformers' defaults filled in."""
    from transformers import CONFIG_MAPPING

    model_type = hf_config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConversionError(f"hf_vision reads model types {', '.join(MODEL_TYPES)}, not {model_type!r}")
    config = CONFIG_MAPPING[model_type].from_dict(hf_config)
    config = config if model_type.endswith("_vision_model") else config.vision_config
    return json.loads(config.to_json_string(use_diff=False))


def pixels(preprocessor: dict | None, clip: bool) -> str:
    """The ViT `pixels` preset of an HF image processor's image_mean / image_std (without a
    preprocessor_config.json: the family's own, OpenAI's statistics for CLIP, 0.5 for SigLIP)."""
    if not preprocessor or "image_mean" not in preprocessor:
        return "clip" if clip else "signed"
    if not preprocessor.get("do_normalize", True):
        raise ConversionError(
            "preprocessor_config.json has do_normalize=false; mmjax towers take normalised pixels"
        )
    stats = np.array([preprocessor["image_mean"], preprocessor.get("image_std", [1.0] * 3)], np.float64)
    for name, preset in PIXELS.items():
        if np.allclose(stats, preset if preset else 0.5, atol=1e-4):
            return name
    raise ConversionError(
        f"preprocessor_config.json normalises with image_mean={stats[0].tolist()}, image_std={stats[1].tolist()}; "
        f"mmjax's ViT knows the presets {', '.join(PIXELS)} (mmjax.models.vit.PIXELS: add this one there)"
    )


def vit_kwargs(vc: dict, preprocessor: dict | None = None) -> dict:
    """ViT kwargs that reproduce the HF vision tower described by the vision config `vc`, on [-1, 1]
    images renormalised as its image processor (`preprocessor`) would have normalised them."""
    clip = vc["model_type"] == "clip_vision_model"
    if vc["hidden_act"] not in ACTIVATIONS:
        raise ConversionError(
            f"hidden_act {vc['hidden_act']!r} is not supported; supported: {sorted(ACTIVATIONS)}"
        )
    if clip:
        pool = "cls"
    else:  # SigLIP: attention-pooling head, or no pooled output at all
        pool = "map" if vc.get("vision_use_head", True) else "none"
    return dict(
        patch_size=vc["patch_size"],
        pixels=pixels(preprocessor, clip),
        width=vc["hidden_size"],
        depth=vc["num_hidden_layers"],
        num_heads=vc["num_attention_heads"],
        mlp_dim=vc["intermediate_size"],
        pool=pool,
        class_token=clip,
        posemb="learn",
        posemb_resize="bicubic",
        patch_bias=not clip,
        pre_norm=clip,
        final_norm="pooled" if clip else "all",
        act=ACTIVATIONS[vc["hidden_act"]],
        layer_norm_eps=vc["layer_norm_eps"],
    )


def vit_from_meta(meta: dict, **overrides) -> ViT:
    """The ViT module of an imported weights folder's meta; overrides e.g. dtype='bfloat16' or remat.
    The imported parameters are in the unscanned layout (scan=False)."""
    if meta.get("kind") != "vit":
        raise ConversionError(f"weights of kind {meta.get('kind')!r} are not a ViT")
    return ViT(**{**meta["model"], **overrides})


class _Tensors:
    """The vision tower's tensors; `take` pops one by its name under the tower, checking it exists."""

    def __init__(self, tensors: dict[str, np.ndarray]):
        self.prefix = "vision_model." if any(k.startswith("vision_model.") for k in tensors) else ""
        self.left = {k[len(self.prefix) :]: v for k, v in tensors.items() if k.startswith(self.prefix)}

    def take(self, name: str) -> np.ndarray:
        if name not in self.left:
            raise ConversionError(f"tensor {self.prefix + name!r} is missing from the weights")
        return self.left.pop(name)

    def weight_bias(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        return self.take(f"{name}.weight"), self.take(f"{name}.bias")

    def linear(self, name: str) -> dict:
        w, b = self.weight_bias(name)
        return {"kernel": w.T, "bias": b}

    def norm(self, name: str) -> dict:
        return {"scale": self.take(f"{name}.weight"), "bias": self.take(f"{name}.bias")}


def _attention(q, k, v, out, heads: int) -> dict:
    """(weight [out, in], bias) pairs of torch q/k/v/out projections -> Attention params."""
    d = out[0].shape[0]
    qkv = {
        n: {"kernel": w.T.reshape(d, heads, -1), "bias": b.reshape(heads, -1)}
        for n, (w, b) in zip("qkv", (q, k, v))
    }
    return {**qkv, "out": {"kernel": out[0].T.reshape(heads, -1, d), "bias": out[1]}}


def _mlp(t: _Tensors, name: str) -> dict:
    return {"wi": t.linear(f"{name}.fc1"), "wo": t.linear(f"{name}.fc2")}


def to_mmjax(
    hf_config: dict, tensors: dict[str, np.ndarray], preprocessor: dict | None = None
) -> tuple[dict, dict]:
    vc = vision_config(hf_config)
    model = vit_kwargs(vc, preprocessor)
    heads, clip = vc["num_attention_heads"], model["class_token"]
    grid = vc["image_size"] // vc["patch_size"]
    t = _Tensors(tensors)

    conv = t.take("embeddings.patch_embedding.weight")  # [D, C, p, p] -> [p, p, C, D]
    params = {"embedding": {"kernel": conv.transpose(2, 3, 1, 0).reshape(-1, conv.shape[0])}}
    if model["patch_bias"]:
        params["embedding"]["bias"] = t.take("embeddings.patch_embedding.bias")
    pos = t.take("embeddings.position_embedding.weight")
    if clip:
        params["cls"] = (t.take("embeddings.class_embedding") + pos[0])[None]
        params["ln_pre"] = t.norm("pre_layrnorm")
        pos = pos[1:]
    if pos.shape[0] != grid * grid:
        raise ConversionError(
            f"position_embedding has {pos.shape[0]} patch rows; image_size {vc['image_size']} / "
            f"patch_size {vc['patch_size']} needs {grid * grid}"
        )
    params["pos_embedding"] = pos.reshape(grid, grid, -1)
    blocks = {}
    for i in range(vc["num_hidden_layers"]):
        n = f"encoder.layers.{i}"
        attn = [t.weight_bias(f"{n}.self_attn.{p}_proj") for p in ("q", "k", "v", "out")]
        blocks[f"block_{i}"] = {
            "ln_1": t.norm(f"{n}.layer_norm1"),
            "attn": _attention(*attn, heads),
            "ln_2": t.norm(f"{n}.layer_norm2"),
            "mlp": _mlp(t, f"{n}.mlp"),
        }
    params["encoder"] = blocks
    params["encoder_norm"] = t.norm("post_layernorm")
    if model["pool"] == "map":
        q, k, v = zip(*(np.split(t.take(f"head.attention.in_proj_{n}"), 3) for n in ("weight", "bias")))
        params["map_head"] = {
            "probe": t.take("head.probe").reshape(1, -1),
            "attn": _attention(q, k, v, t.weight_bias("head.attention.out_proj"), heads),
            "ln": t.norm("head.layernorm"),
            "mlp": _mlp(t, "head.mlp"),
        }
    if t.left:
        raise ConversionError(
            f"the {vc['model_type']} vision tower has tensors this converter does not know: "
            f"{sorted(t.prefix + k for k in t.left)[:5]}"
        )
    _check_shapes(params, model, vc)
    meta = {
        "kind": "vit",
        "hf_model_type": hf_config["model_type"],
        "model": model,
        "image_size": vc["image_size"],
        "hf_config": vc,
    }
    return params, meta


def _check_shapes(params: dict, model: dict, vc: dict) -> None:
    """Raises unless `params` has exactly the ViT's parameter names and shapes at the config's size."""
    images = jax.ShapeDtypeStruct((1, vc["image_size"], vc["image_size"], vc["num_channels"]), np.float32)
    abstract = nn.unbox(jax.eval_shape(ViT(**model).init, jax.random.key(0), images)["params"])
    got, want = ({n: tuple(x.shape) for n, x in tree.flat(t).items()} for t in (params, abstract))
    bad = [
        f"{n}: {got.get(n)} in the weights, {want.get(n)} in the model"
        for n in sorted(got.keys() | want.keys())
        if got.get(n) != want.get(n)
    ]
    if bad:
        raise ConversionError(
            f"the weights do not fit the config's ViT ({len(bad)} mismatches), e.g. {bad[:3]}"
        )
