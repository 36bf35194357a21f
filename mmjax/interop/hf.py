"""Hugging Face interop: local HF model folders <-> mmjax weights folders.

  mmjax convert hf-import SRC DST   # config.json + *.safetensors (sharded index too) -> DST
  mmjax convert hf-export SRC DST   # an mmjax LLM weights folder -> a folder transformers loads

Weights are read with safetensors only: a folder with just pickle `.bin`/`.pt` weights is
refused (unpickling runs code from whoever made the file). Each architecture family has a
converter module with `to_mmjax(hf_config, tensors[, preprocessor]) -> (params, meta)` (it gets the
folder's preprocessor_config.json when it takes `preprocessor`) and, where export is
supported, `to_hf(params, meta) -> (hf_config, tensors)`.
"""

from __future__ import annotations

import glob
import inspect
import json
import os
from types import ModuleType

import numpy as np
from safetensors.numpy import load_file, save_file

from mmjax import weights
from mmjax.interop import ConversionError


def _converters() -> dict[str, ModuleType]:
    from mmjax.interop import diffusers_vae, hf_llm, hf_vision

    return {
        **{t: hf_llm for t in hf_llm.MODEL_TYPES},
        **{t: hf_vision for t in hf_vision.MODEL_TYPES},
        **{t: diffusers_vae for t in diffusers_vae.MODEL_TYPES},  # diffusers: `_class_name`
    }


def read_folder(src: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json as a dict, {tensor name: float32 numpy array}) of a local HF model folder."""
    src = os.path.expanduser(src)
    cfg_file = os.path.join(src, "config.json")
    if not os.path.isfile(cfg_file):
        raise ConversionError(f"{src} has no config.json; point at a local Hugging Face model folder")
    with open(cfg_file) as f:
        config = json.load(f)
    files = sorted(glob.glob(os.path.join(src, "*.safetensors")))
    index = os.path.join(src, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted({os.path.join(src, v) for v in json.load(f)["weight_map"].values()})
    if not files:
        pickled = [
            os.path.basename(p)
            for p in glob.glob(os.path.join(src, "*.bin")) + glob.glob(os.path.join(src, "*.pt"))
        ]
        hint = (
            f" It has pickle weights ({', '.join(pickled)}), which mmjax refuses to load: unpickling can run arbitrary code."
            if pickled
            else ""
        )
        raise ConversionError(
            f"{src} has no *.safetensors weights.{hint} Convert them once in a trusted environment, e.g. "
            f"`AutoModel.from_pretrained(src).save_pretrained(dst, safe_serialization=True)`"
        )
    tensors = {}
    for file in files:
        for name, value in load_file(file).items():
            tensors[name] = np.asarray(value, np.float32)
    return config, tensors


def hf_import(src: str, dst: str) -> dict:
    """Converts the HF folder `src` to the mmjax weights folder `dst`; returns its meta."""
    config, tensors = read_folder(src)
    model_type = config.get("model_type") or config.get("_class_name", "")  # transformers or diffusers
    converters = _converters()
    if model_type not in converters:
        raise ConversionError(
            f"model_type {model_type!r} in {src}/config.json is not supported; supported: {', '.join(sorted(converters))}"
        )
    to_mmjax, extra = converters[model_type].to_mmjax, {}
    preprocessor = os.path.join(os.path.expanduser(src), "preprocessor_config.json")
    if "preprocessor" in inspect.signature(to_mmjax).parameters and os.path.isfile(preprocessor):
        with open(preprocessor) as f:  # an image processor's statistics (the vision towers)
            extra["preprocessor"] = json.load(f)
    params, meta = to_mmjax(config, tensors, **extra)
    meta = {**meta, "source": os.path.abspath(os.path.expanduser(src))}
    weights.save(dst, params, meta)
    return meta


def hf_export(src: str, dst: str) -> dict:
    """Writes the mmjax weights folder `src` as an HF folder (config.json + model.safetensors, and
    the tokenizer files when the folder holds a tokenizer: `mmjax export` saves the recipe's)."""
    params, meta = weights.load(src)
    converters = _converters()
    module = converters.get(meta.get("hf_model_type", ""))
    if module is None or not hasattr(module, "to_hf"):
        exportable = sorted(t for t, m in converters.items() if hasattr(m, "to_hf"))
        raise ConversionError(
            f"{src} holds a {meta.get('kind')!r} model ({meta.get('hf_model_type')!r}); hf-export writes "
            f"model types {', '.join(exportable)}"
        )
    config, tensors = module.to_hf(params, meta)
    os.makedirs(dst, exist_ok=True)
    save_file(
        {k: np.ascontiguousarray(v) for k, v in tensors.items()},
        os.path.join(dst, "model.safetensors"),
        metadata={"format": "pt"},
    )
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    tokenizer = weights.tokenizer_path(src)
    if tokenizer is not None:
        for file in tokenizer.iterdir():
            with open(os.path.join(dst, file.name), "wb") as f:
                f.write(file.read_bytes())
    return config
