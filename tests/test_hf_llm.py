"""Llama / Qwen2 imported from local HF folders match transformers (PyTorch CPU), fp32; export round-trips."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tr

from mmjax.interop import hf, hf_llm
from mmjax.models.llm import stack_layers
from mmjax.sampling.decode import generate
from mmjax import weights
from tests.conftest import run_mmjax

BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
CASES = {
    'llama_gqa': (tr.LlamaConfig, dict(rope_theta=500.0)),
    'qwen2_tied': (tr.Qwen2Config, dict(tie_word_embeddings=True, num_key_value_heads=4)),
    'llama_llama3': (
        tr.LlamaConfig,
        dict(
            rope_scaling=dict(
                rope_type='llama3',
                factor=4.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            )
        ),
    ),
    'llama_linear': (tr.LlamaConfig, dict(rope_scaling=dict(type='linear', factor=2.0))),
    'llama_dynamic': (
        tr.LlamaConfig,
        dict(max_position_embeddings=16, rope_scaling=dict(type='dynamic', factor=2.0)),
    ),
    'qwen2_yarn': (
        tr.Qwen2Config,
        dict(rope_scaling=dict(rope_type='yarn', factor=4.0, original_max_position_embeddings=16)),
    ),
}
TOKENS = np.random.default_rng(0).integers(3, 128, size=(2, 24))  # 24 > 16: the scaled RoPE regimes kick in
TOL = dict(atol=1e-4, rtol=1e-4)


def save_random(model, path):
    """Perturbs every parameter (no zero biases or unit norm scales survive), then save_pretrained."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.eval().save_pretrained(str(path))
    return model


def hf_run(model, tokens):
    """(logits, final-normed hidden states) of an HF causal LM."""
    with torch.no_grad():
        out = model(torch.from_numpy(np.asarray(tokens)), output_hidden_states=True)
        hidden = model.model(torch.from_numpy(np.asarray(tokens))).last_hidden_state
    return out.logits.numpy(), hidden.numpy()


def mmjax_run(dst, tokens, **overrides):
    params, meta = weights.load(str(dst))
    llm = hf_llm.llm_from_meta(meta, **overrides)
    if overrides.get('scan'):
        params = stack_layers(params, llm.depth)
    logits, aux = jax.jit(lambda t: llm.apply({'params': params}, t))(tokens)
    return np.asarray(logits), np.asarray(aux['hidden'])


@pytest.fixture(scope='module')
def imported(tmp_path_factory):
    """{case: (HF model, HF folder, mmjax folder)}, built lazily."""
    made = {}

    def get(case):
        if case not in made:
            cls, extra = CASES[case]
            src, dst = tmp_path_factory.mktemp(f'{case}_hf'), tmp_path_factory.mktemp(f'{case}_mmjax')
            model = save_random(tr.AutoModelForCausalLM.from_config(cls(**{**BASE, **extra})), src)
            hf.hf_import(str(src), str(dst))
            made[case] = model, src, dst
        return made[case]

    return get


@pytest.mark.parametrize('case', list(CASES))
def test_logits_and_hidden_match_hf(imported, case):
    model, _, dst = imported(case)
    logits, hidden = mmjax_run(dst, TOKENS)
    ref_logits, ref_hidden = hf_run(model, TOKENS)
    np.testing.assert_allclose(hidden, ref_hidden, **TOL)
    np.testing.assert_allclose(logits, ref_logits, **TOL)
    assert np.abs(ref_logits).max() > 0.5  # not a degenerate model


def test_meta_describes_the_model(imported):
    _, src, dst = imported('qwen2_tied')
    meta = weights.read_meta(str(dst))
    with open(os.path.join(src, 'config.json')) as f:
        assert meta['hf_config'] == json.load(f)
    assert (meta['kind'], meta['hf_model_type']) == ('llm', 'qwen2')
    m = meta['model']
    assert (m['qkv_bias'], m['out_bias'], m['tie_embeddings'], m['num_kv_heads']) == (True, False, True, 4)
    params, _ = weights.load(str(dst))
    assert 'lm_head' not in params and params['decoder']['block_0']['attn']['q']['bias'].shape == (4, 16)
    assert (
        weights.read_meta(str(imported('llama_llama3')[2]))['model']['rope_scaling']['rope_type'] == 'llama3'
    )


def test_scan_matches_unscanned(imported):
    _, _, dst = imported('llama_gqa')
    ref, _ = mmjax_run(dst, TOKENS)
    scanned, _ = mmjax_run(dst, TOKENS, scan=True)
    np.testing.assert_allclose(scanned, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('scan', [False, True])
def test_hidden_layer_is_hfs_hidden_states(imported, scan):
    """hidden_layer=k (IOMM's model.mllm_layer) gives HF's hidden_states[k]: the embeddings, then
    each block's output before the final norm."""
    model, _, dst = imported('llama_gqa')
    with torch.no_grad():
        ref = model(torch.from_numpy(TOKENS), output_hidden_states=True).hidden_states
    for k in (0, 1):
        _, hidden = mmjax_run(dst, TOKENS, scan=scan, hidden_layer=k)
        np.testing.assert_allclose(hidden, ref[k].numpy(), **TOL)
    assert not np.allclose(ref[0].numpy(), ref[1].numpy(), atol=1e-2)
    with pytest.raises(ValueError, match='hidden_layer=2'):
        hf_llm.llm_from_meta(weights.read_meta(str(dst)), hidden_layer=2)


def test_greedy_generation_matches_hf(imported):
    model, _, dst = imported('llama_gqa')
    lengths = [9, 5, 7]
    rng = np.random.default_rng(1)
    prompts = np.zeros((3, 9), np.int64)  # left padded with pad_token_id 0
    for row, n in enumerate(lengths):
        prompts[row, 9 - n :] = rng.integers(3, 128, size=n)
    mask = prompts != 0
    with torch.no_grad():
        ref = model.generate(
            torch.from_numpy(prompts),
            attention_mask=torch.from_numpy(mask.astype(np.int64)),
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=2,
        )[:, 9:].numpy()
    params, meta = weights.load(str(dst))
    ids, _ = generate(
        hf_llm.llm_from_meta(meta),
        params,
        jnp.asarray(prompts),
        prompt_mask=mask,
        max_new_tokens=8,
        stop_tokens=(2,),
    )
    np.testing.assert_array_equal(np.asarray(ids)[:, : ref.shape[1]], ref)


@pytest.mark.parametrize('case', ['qwen2_tied', 'llama_llama3'])
def test_export_round_trips_and_loads_in_transformers(imported, tmp_path, case):
    model, _, dst = imported(case)
    hf.hf_export(str(dst), str(tmp_path / 'hf'))
    hf.hf_import(str(tmp_path / 'hf'), str(tmp_path / 'again'))
    before, after = weights.load(str(dst))[0], weights.load(str(tmp_path / 'again'))[0]
    assert jax.tree.structure(before) == jax.tree.structure(after)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)
    reloaded = tr.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'hf')).eval()
    assert type(reloaded) is type(model)
    np.testing.assert_allclose(hf_run(reloaded, TOKENS)[0], hf_run(model, TOKENS)[0], atol=1e-6, rtol=1e-6)


def test_export_from_scanned_params(imported, tmp_path):
    _, _, dst = imported('llama_gqa')
    params, meta = weights.load(str(dst))
    _, tensors = hf_llm.to_hf(params, meta)
    _, scanned = hf_llm.to_hf(stack_layers(params, meta['model']['depth']), meta)
    assert tensors.keys() == scanned.keys()
    for name in tensors:
        np.testing.assert_array_equal(tensors[name], scanned[name])


def test_cli_import(imported, tmp_path):
    model, src, _ = imported('qwen2_tied')
    run_mmjax('convert', 'hf-import', str(src), str(tmp_path / 'w'))
    logits, _ = mmjax_run(tmp_path / 'w', TOKENS)
    np.testing.assert_allclose(logits, hf_run(model, TOKENS)[0], **TOL)


def test_refuses_pickle_and_unsupported(tmp_path):
    model = tr.AutoModelForCausalLM.from_config(tr.LlamaConfig(**BASE))
    model.config.save_pretrained(str(tmp_path))
    torch.save(model.state_dict(), str(tmp_path / 'pytorch_model.bin'))
    with pytest.raises(hf.ConversionError, match='pickle'):
        hf.hf_import(str(tmp_path), str(tmp_path / 'out'))
    with pytest.raises(hf.ConversionError, match='hidden_act'):
        hf_llm.llm_kwargs({**BASE, 'model_type': 'llama', 'hidden_act': 'gelu'})
    with pytest.raises(hf.ConversionError, match='missing'):
        hf_llm.to_mmjax({**BASE, 'model_type': 'llama'}, {})
