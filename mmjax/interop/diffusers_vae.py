"""diffusers AutoencoderKL folders -> the mmjax AutoencoderKL (import only).

A diffusers folder (`config.json` with `"_class_name": "AutoencoderKL"`, `diffusion_pytorch_model.safetensors`),
e.g. the `vae/` folder of a Stable Diffusion / SDXL / SD3 / FLUX pipeline. Config values it does not
list take diffusers' defaults. Tensor names (torch conv [out, in, kh, kw] -> HWIO, linear [out, in] -> [in, out]):
  {encoder,decoder}.conv_in / conv_out / conv_norm_out     -> {encoder,decoder}/conv_in / conv_out / norm_out
  encoder.down_blocks.i.resnets.j.{norm1,conv1,norm2,conv2,conv_shortcut} -> encoder/down_i/resnet_j/...
  encoder.down_blocks.i.downsamplers.0.conv                -> encoder/down_i/downsample
  decoder.up_blocks.i.resnets.j / upsamplers.0.conv        -> decoder/up_i/resnet_j / upsample
  *.mid_block.resnets.{0,1}                                -> */mid/resnet_{0,1}
  *.mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0} -> */mid/attn/{norm,q,k,v,out}
      (the pre-0.14 names query/key/value/proj_attn read the same)
  quant_conv / post_quant_conv                             -> quant_conv / post_quant_conv
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

from mmjax import tree
from mmjax.interop import ConversionError
from mmjax.models.autoencoder_kl import AutoencoderKL

MODEL_TYPES = ("AutoencoderKL",)  # config.json `_class_name`
DEFAULTS = dict(  # diffusers AutoencoderKL.__init__
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",),
    up_block_types=("UpDecoderBlock2D",),
    block_out_channels=(64,),
    layers_per_block=1,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=32,
    scaling_factor=0.18215,
    shift_factor=None,
    use_quant_conv=True,
    use_post_quant_conv=True,
    mid_block_add_attention=True,
)
_OLD_ATTN = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def model_kwargs(config: dict) -> dict:
    """AutoencoderKL kwargs (JSON-able) of a diffusers AutoencoderKL config.json."""
    c = {**DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    n = len(c["block_out_channels"])
    bad = [
        f"{k}={c[k]!r}"
        for k, ok in (
            ("act_fn", c["act_fn"] in ("silu", "swish")),
            ("down_block_types", list(c["down_block_types"]) == ["DownEncoderBlock2D"] * n),
            ("up_block_types", list(c["up_block_types"]) == ["UpDecoderBlock2D"] * n),
        )
        if not ok
    ]
    if bad:
        raise ConversionError(
            f"this AutoencoderKL is not supported ({', '.join(bad)}); mmjax reads act_fn 'silu' and "
            f"DownEncoderBlock2D / UpDecoderBlock2D blocks, one per block_out_channels entry"
        )
    keys = [f.name for f in AutoencoderKL.__dataclass_fields__.values() if f.name in DEFAULTS]
    model = {k: c[k] for k in keys}
    model["block_out_channels"] = [int(x) for x in c["block_out_channels"]]
    return model


class _Tensors:
    """The state dict; `take` pops a tensor by name, checking it exists."""

    def __init__(self, tensors: dict[str, np.ndarray]):
        self.left = dict(tensors)

    def take(self, name: str, old: str | None = None) -> np.ndarray:
        if name not in self.left and old in self.left:
            name = old
        if name not in self.left:
            raise ConversionError(f"tensor {name!r} is missing from the weights")
        return self.left.pop(name)

    def conv(self, name: str) -> dict:
        w = self.take(f"{name}.weight")  # [out, in, kh, kw] -> [kh, kw, in, out]
        return {"kernel": w.transpose(2, 3, 1, 0), "bias": self.take(f"{name}.bias")}

    def norm(self, name: str) -> dict:
        return {"scale": self.take(f"{name}.weight"), "bias": self.take(f"{name}.bias")}

    def linear(self, path: str, name: str) -> dict:
        w = self.take(f"{path}.{name}.weight", f"{path}.{_OLD_ATTN[name]}.weight")
        w = w.reshape(w.shape[:2])  # [out, in] (a 1x1 conv of old checkpoints: [out, in, 1, 1])
        return {"kernel": w.T, "bias": self.take(f"{path}.{name}.bias", f"{path}.{_OLD_ATTN[name]}.bias")}

    def resnet(self, name: str) -> dict:
        p = {n: self.norm(f"{name}.{n}") for n in ("norm1", "norm2")}
        p |= {n: self.conv(f"{name}.{n}") for n in ("conv1", "conv2")}
        if f"{name}.conv_shortcut.weight" in self.left:
            p["conv_shortcut"] = self.conv(f"{name}.conv_shortcut")
        return p

    def mid(self, name: str, attention: bool) -> dict:
        p = {f"resnet_{j}": self.resnet(f"{name}.resnets.{j}") for j in (0, 1)}
        if attention:
            a = f"{name}.attentions.0"
            p["attn"] = {"norm": self.norm(f"{a}.group_norm")}
            p["attn"] |= {n: self.linear(a, t) for n, t in zip(("q", "k", "v", "out"), _OLD_ATTN)}
        return p


def to_mmjax(config: dict, tensors: dict[str, np.ndarray]) -> tuple[dict, dict]:
    model = model_kwargs(config)
    n, per = len(model["block_out_channels"]), model["layers_per_block"]
    attn = model["mid_block_add_attention"]
    t = _Tensors(tensors)

    enc = {"conv_in": t.conv("encoder.conv_in")}
    for i in range(n):
        b = f"encoder.down_blocks.{i}"
        enc[f"down_{i}"] = {f"resnet_{j}": t.resnet(f"{b}.resnets.{j}") for j in range(per)}
        if i < n - 1:
            enc[f"down_{i}"]["downsample"] = t.conv(f"{b}.downsamplers.0.conv")
    enc["mid"] = t.mid("encoder.mid_block", attn)
    enc["norm_out"], enc["conv_out"] = t.norm("encoder.conv_norm_out"), t.conv("encoder.conv_out")

    dec = {"conv_in": t.conv("decoder.conv_in"), "mid": t.mid("decoder.mid_block", attn)}
    for i in range(n):
        b = f"decoder.up_blocks.{i}"
        dec[f"up_{i}"] = {f"resnet_{j}": t.resnet(f"{b}.resnets.{j}") for j in range(per + 1)}
        if i < n - 1:
            dec[f"up_{i}"]["upsample"] = t.conv(f"{b}.upsamplers.0.conv")
    dec["norm_out"], dec["conv_out"] = t.norm("decoder.conv_norm_out"), t.conv("decoder.conv_out")

    params = {"encoder": enc, "decoder": dec}
    if model["use_quant_conv"]:
        params["quant_conv"] = t.conv("quant_conv")
    if model["use_post_quant_conv"]:
        params["post_quant_conv"] = t.conv("post_quant_conv")
    if t.left:
        raise ConversionError(
            f"the AutoencoderKL has tensors this converter does not know: {sorted(t.left)[:5]} "
            f"({len(t.left)} in all)"
        )
    _check_shapes(params, model)
    c = {**DEFAULTS, **config}
    meta = {
        "kind": "autoencoder_kl",
        "hf_model_type": "AutoencoderKL",
        "model": model,
        "image_size": c["sample_size"],
        "hf_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in c.items()},
    }
    return params, meta


def _check_shapes(params: dict, model: dict) -> None:
    """Raises unless `params` has exactly the module's parameter names and shapes."""
    vae = AutoencoderKL(**model)
    side = vae.downsample_factor
    images = jax.ShapeDtypeStruct((1, side, side, model["in_channels"]), np.float32)
    abstract = nn.unbox(jax.eval_shape(vae.init, jax.random.key(0), images)["params"])
    got, want = ({n: tuple(x.shape) for n, x in tree.flat(p).items()} for p in (params, abstract))
    bad = [
        f"{n}: {got.get(n)} in the weights, {want.get(n)} in the model"
        for n in sorted(got.keys() | want.keys())
        if got.get(n) != want.get(n)
    ]
    if bad:
        raise ConversionError(
            f"the weights do not fit the config's AutoencoderKL ({len(bad)} mismatches), e.g. {bad[:3]}"
        )
