"""Llama / TinyLlama / Qwen2 / Qwen2.5 (Hugging Face transformers) <-> the mmjax LLM.

  model.embed_tokens                        -> embedder/embedding [vocab, D]
  model.layers.i.input_layernorm            -> decoder/block_i/attn_norm/scale
  model.layers.i.self_attn.{q,k,v}_proj     -> decoder/block_i/attn/{q,k,v}/{kernel [D, H, hd], bias [H, hd]}
  model.layers.i.self_attn.o_proj           -> decoder/block_i/attn/out/{kernel [H, hd, D], bias}
  model.layers.i.post_attention_layernorm   -> decoder/block_i/mlp_norm/scale
  model.layers.i.mlp.{gate,up,down}_proj    -> decoder/block_i/mlp/{wg, wi, wo}
  model.norm                                -> final_norm/scale
  lm_head                                   -> lm_head/kernel [D, vocab] (untied only)
Config defaults come from transformers' config classes, so a config.json listing only
non-default values (or the 4.x `rope_theta` / `rope_scaling` keys) reads right. Export writes
the installed transformers' config format (`rope_parameters`) and accepts either param layout
(scan or not).
"""

from __future__ import annotations

import json

import numpy as np

from mmjax.interop import ConversionError
from mmjax.models.llm import LLM, unstack_layers
from mmjax.models.rope import ROPE_TYPES

MODEL_TYPES = ('llama', 'qwen2')
_IGNORED = ('rotary_emb.inv_freq',)  # non-persistent buffers some old checkpoints saved


def full_config(hf_config: dict) -> dict:
    """`hf_config` with transformers' defaults filled in (rope settings under `rope_parameters`)."""
    from transformers import CONFIG_MAPPING

    model_type = hf_config.get('model_type')
    if model_type not in MODEL_TYPES:
        raise ConversionError(f'hf_llm reads model types {", ".join(MODEL_TYPES)}, not {model_type!r}')
    config = CONFIG_MAPPING[model_type].from_dict(hf_config)
    return json.loads(config.to_json_string(use_diff=False))


def llm_kwargs(hf_config: dict) -> dict:
    """LLM kwargs that reproduce the HF model described by `hf_config`."""
    c = full_config(hf_config)
    if c['hidden_act'] != 'silu':
        raise ConversionError(
            f"hidden_act {c['hidden_act']!r} is not supported; the LLM's MLP is SwiGLU (silu)"
        )
    if any(t != 'full_attention' for t in c.get('layer_types') or []):
        raise ConversionError('sliding-window attention layers are not supported; the LLM attends globally')
    rope = dict(c['rope_parameters'])
    theta, kind = rope.pop('rope_theta'), rope.pop('rope_type', 'default')
    rope.pop('type', None)
    if kind not in ROPE_TYPES:
        raise ConversionError(f'rope_type {kind!r} is not supported; supported: {", ".join(ROPE_TYPES)}')
    if rope.pop('partial_rotary_factor', 1.0) != 1.0:
        raise ConversionError('partial_rotary_factor != 1 is not supported')
    scaling = None
    if kind != 'default':
        scaling = {'rope_type': kind, **rope}
        scaling.setdefault('original_max_position_embeddings', c['max_position_embeddings'])
    attention_bias = c.get('attention_bias', False)
    qwen = c['model_type'] == 'qwen2'
    return dict(
        vocab_size=c['vocab_size'],
        width=c['hidden_size'],
        depth=c['num_hidden_layers'],
        num_heads=c['num_attention_heads'],
        num_kv_heads=c.get('num_key_value_heads') or c['num_attention_heads'],
        head_dim=c.get('head_dim') or c['hidden_size'] // c['num_attention_heads'],
        mlp_dim=c['intermediate_size'],
        rope_theta=float(theta),
        rope_scaling=scaling,
        norm_eps=c['rms_norm_eps'],
        qkv_bias=True if qwen else attention_bias,
        out_bias=False if qwen else attention_bias,
        mlp_bias=c.get('mlp_bias', False),
        tie_embeddings=bool(c.get('tie_word_embeddings', False)),
    )


def llm_from_meta(meta: dict, **overrides) -> LLM:
    """The LLM module of a weights folder's meta (`weights.read_meta`), e.g. dtype=jnp.bfloat16, scan=True."""
    if meta.get('kind') != 'llm':
        raise ConversionError(f"weights of kind {meta.get('kind')!r} are not an LLM")
    return LLM(**{**meta['model'], **overrides})


class _Tensors:
    """HF tensors by name; records which were read, so leftovers can be reported."""

    def __init__(self, tensors: dict[str, np.ndarray]):
        self.tensors, self.used = tensors, set()

    def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.tensors:
            raise ConversionError(f'tensor {name!r} is missing from the weights')
        value = self.tensors[name]
        if tuple(value.shape) != tuple(shape):
            raise ConversionError(
                f'tensor {name!r} is {tuple(value.shape)}, the config implies {tuple(shape)}'
            )
        self.used.add(name)
        return value

    def leftovers(self) -> list[str]:
        return sorted(n for n in self.tensors if n not in self.used and not n.endswith(_IGNORED))


def to_mmjax(hf_config: dict, tensors: dict[str, np.ndarray]) -> tuple[dict, dict]:
    kw = llm_kwargs(hf_config)
    t = _Tensors(tensors)
    D, H, K, hd, F, V = (
        kw[k] for k in ('width', 'num_heads', 'num_kv_heads', 'head_dim', 'mlp_dim', 'vocab_size')
    )

    def linear_in(name: str, heads: int, bias: bool) -> dict:  # [heads * hd, D] -> [D, heads, hd]
        out = {'kernel': t.take(f'{name}.weight', (heads * hd, D)).T.reshape(D, heads, hd)}
        if bias:
            out['bias'] = t.take(f'{name}.bias', (heads * hd,)).reshape(heads, hd)
        return out

    def linear(name: str, n_in: int, n_out: int, bias: bool) -> dict:  # [out, in] -> [in, out]
        out = {'kernel': t.take(f'{name}.weight', (n_out, n_in)).T}
        if bias:
            out['bias'] = t.take(f'{name}.bias', (n_out,))
        return out

    decoder = {}
    for i in range(kw['depth']):
        p = f'model.layers.{i}'
        out = {'kernel': t.take(f'{p}.self_attn.o_proj.weight', (D, H * hd)).T.reshape(H, hd, D)}
        if kw['out_bias']:
            out['bias'] = t.take(f'{p}.self_attn.o_proj.bias', (D,))
        decoder[f'block_{i}'] = {
            'attn_norm': {'scale': t.take(f'{p}.input_layernorm.weight', (D,))},
            'attn': {
                'q': linear_in(f'{p}.self_attn.q_proj', H, kw['qkv_bias']),
                'k': linear_in(f'{p}.self_attn.k_proj', K, kw['qkv_bias']),
                'v': linear_in(f'{p}.self_attn.v_proj', K, kw['qkv_bias']),
                'out': out,
            },
            'mlp_norm': {'scale': t.take(f'{p}.post_attention_layernorm.weight', (D,))},
            'mlp': {
                'wg': linear(f'{p}.mlp.gate_proj', D, F, kw['mlp_bias']),
                'wi': linear(f'{p}.mlp.up_proj', D, F, kw['mlp_bias']),
                'wo': linear(f'{p}.mlp.down_proj', F, D, kw['mlp_bias']),
            },
        }
    params = {
        'embedder': {'embedding': t.take('model.embed_tokens.weight', (V, D))},
        'decoder': decoder,
        'final_norm': {'scale': t.take('model.norm.weight', (D,))},
    }
    if kw['tie_embeddings']:
        t.used.add('lm_head.weight')  # some tied checkpoints store the shared table twice
    else:
        params['lm_head'] = {'kernel': t.take('lm_head.weight', (V, D)).T}
    if t.leftovers():
        raise ConversionError(f'weights the LLM has no place for: {t.leftovers()[:5]}')
    meta = {'kind': 'llm', 'hf_model_type': hf_config['model_type'], 'model': kw, 'hf_config': hf_config}
    return params, meta


def to_hf(params: dict, meta: dict) -> tuple[dict, dict[str, np.ndarray]]:
    from transformers import CONFIG_MAPPING

    model_type, m = meta['hf_model_type'], LLM(**meta['model'])
    if model_type not in MODEL_TYPES:
        raise ConversionError(f'hf_llm writes model types {", ".join(MODEL_TYPES)}, not {model_type!r}')
    if model_type == 'qwen2' and not (m.qkv_bias and not m.out_bias and not m.mlp_bias):
        raise ConversionError(
            'qwen2 has q/k/v biases only: needs qkv_bias=True, out_bias=False, mlp_bias=False'
        )
    if model_type == 'llama' and m.qkv_bias != m.out_bias:
        raise ConversionError('llama attention_bias covers q/k/v and o together: needs qkv_bias == out_bias')
    rope = {'rope_theta': m.rope_theta, 'rope_type': 'default', **dict(m.rope_scaling or {})}
    fields = dict(
        model_type=model_type,
        architectures=['LlamaForCausalLM' if model_type == 'llama' else 'Qwen2ForCausalLM'],
        vocab_size=m.vocab_size,
        hidden_size=m.width,
        num_hidden_layers=m.depth,
        num_attention_heads=m.num_heads,
        num_key_value_heads=m.kv_heads,
        head_dim=m.head_size,
        intermediate_size=m.mlp_dim,
        hidden_act='silu',
        rms_norm_eps=m.norm_eps,
        tie_word_embeddings=m.tie_embeddings,
        rope_parameters=rope,
    )
    if rope['rope_type'] == 'dynamic':  # HF's dynamic NTK reads its original length here
        fields['max_position_embeddings'] = rope['original_max_position_embeddings']
    if model_type == 'llama':
        fields.update(attention_bias=m.qkv_bias, mlp_bias=m.mlp_bias)
    base = {k: v for k, v in meta.get('hf_config', {}).items() if k not in ('rope_scaling', 'rope_theta')}
    config = CONFIG_MAPPING[model_type].from_dict({**base, **fields}).to_dict()

    params = unstack_layers(params)
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    tensors = {
        'model.embed_tokens.weight': f32(params['embedder']['embedding']),
        'model.norm.weight': f32(params['final_norm']['scale']),
    }
    if not m.tie_embeddings:
        tensors['lm_head.weight'] = f32(params['lm_head']['kernel']).T
    for i in range(m.depth):
        b, pre = params['decoder'][f'block_{i}'], f'model.layers.{i}'
        tensors[f'{pre}.input_layernorm.weight'] = f32(b['attn_norm']['scale'])
        tensors[f'{pre}.post_attention_layernorm.weight'] = f32(b['mlp_norm']['scale'])
        for name in 'qkv':
            a = b['attn'][name]
            tensors[f'{pre}.self_attn.{name}_proj.weight'] = f32(a['kernel']).reshape(m.width, -1).T
            if 'bias' in a:
                tensors[f'{pre}.self_attn.{name}_proj.bias'] = f32(a['bias']).reshape(-1)
        out = b['attn']['out']
        tensors[f'{pre}.self_attn.o_proj.weight'] = f32(out['kernel']).reshape(-1, m.width).T
        if 'bias' in out:
            tensors[f'{pre}.self_attn.o_proj.bias'] = f32(out['bias'])
        for hf_name, name in (('gate_proj', 'wg'), ('up_proj', 'wi'), ('down_proj', 'wo')):
            tensors[f'{pre}.mlp.{hf_name}.weight'] = f32(b['mlp'][name]['kernel']).T
            if 'bias' in b['mlp'][name]:
                tensors[f'{pre}.mlp.{hf_name}.bias'] = f32(b['mlp'][name]['bias'])
    return config, tensors
