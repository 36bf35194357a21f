"""CLIP / SigLIP vision towers imported from local HF folders match transformers (PyTorch CPU), fp32."""

import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers as tr
from safetensors.numpy import load_file, save_file
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from mmjax.interop import hf, hf_vision
from mmjax.models.vit import _torch_bicubic_matrix, resize_posemb
from mmjax import weights
from tests.conftest import ROOT, run_mmjax

VISION = dict(
    image_size=32,
    patch_size=8,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
)
TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    vocab_size=64,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)
TOL = dict(atol=1e-4, rtol=1e-4)


def save_random(model, path):
    """Perturbs every parameter (no zero biases or unit norm scales survive), then save_pretrained."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.eval().save_pretrained(str(path))
    return model


def images(h, w, seed=0):
    """NHWC images in [-1, 1], the input of every mmjax tower."""
    return np.random.default_rng(seed).uniform(-1, 1, size=(2, h, w, 3)).astype(np.float32)


def hf_run(model, x, interpolate=False):
    """(last_hidden_state, pooler_output) of an HF vision model on NHWC [-1, 1] images, normalised as
    its family's image processor does (transformers' constants: OpenAI's for CLIP, 0.5 for SigLIP)."""
    if isinstance(model.config, tr.CLIPVisionConfig):
        mean, std = np.array(OPENAI_CLIP_MEAN), np.array(OPENAI_CLIP_STD)
        x = (((x.astype(np.float64) + 1) / 2 - mean) / std).astype(np.float32)
    with torch.no_grad():
        o = model(
            pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2)), interpolate_pos_encoding=interpolate
        )
    return o.last_hidden_state.numpy(), o.pooler_output.numpy()


def load_vit(dst, **overrides):
    """(jitted images -> aux, meta) of an mmjax weights folder."""
    params, meta = weights.load(str(dst))
    vit = hf_vision.vit_from_meta(meta, **overrides)
    return jax.jit(lambda x: vit.apply({'params': params}, x)[1]), meta


@pytest.fixture(scope='module')
def clip(tmp_path_factory):
    src, dst = tmp_path_factory.mktemp('clip_hf'), tmp_path_factory.mktemp('clip_mmjax')
    model = save_random(tr.CLIPVisionModel(tr.CLIPVisionConfig(**VISION)), src)
    hf.hf_import(str(src), str(dst))
    return model, src, dst


@pytest.fixture(scope='module')
def siglip(tmp_path_factory):
    src, dst = tmp_path_factory.mktemp('siglip_hf'), tmp_path_factory.mktemp('siglip_mmjax')
    model = save_random(tr.SiglipVisionModel(tr.SiglipVisionConfig(**VISION)), src)
    hf.hf_import(str(src), str(dst))
    return model, src, dst


def test_clip_matches_hf(clip):
    model, _, dst = clip
    run, meta = load_vit(dst)
    x = images(32, 32)
    hidden, pooled = hf_run(model, x)
    aux = run(x)
    assert aux['tokens'].shape == (2, 17, 32) and aux['patches'].shape == (2, 16, 32)
    np.testing.assert_allclose(aux['tokens'], hidden, **TOL)
    np.testing.assert_allclose(aux['pooled'], pooled, **TOL)
    m = meta['model']
    assert (m['act'], m['final_norm'], m['patch_bias'], m['pool']) == ('quick_gelu', 'pooled', False, 'cls')
    assert m['pixels'] == 'clip'  # the family's statistics when the folder has no preprocessor_config.json
    assert m['layer_norm_eps'] == 1e-5 and meta['image_size'] == 32
    assert meta['hf_model_type'] == 'clip_vision_model' and meta['hf_config']['hidden_size'] == 32


def test_siglip_matches_hf(siglip):
    model, _, dst = siglip
    run, meta = load_vit(dst)
    x = images(32, 32)
    hidden, pooled = hf_run(model, x)
    aux = run(x)
    assert aux['tokens'].shape == (2, 16, 32)
    np.testing.assert_allclose(aux['tokens'], hidden, **TOL)
    np.testing.assert_allclose(aux['pooled'], pooled, **TOL)
    m = meta['model']
    assert (m['act'], m['final_norm'], m['patch_bias'], m['pool']) == ('gelu_tanh', 'all', True, 'map')
    assert m['pixels'] == 'signed'  # SigLIP normalises with mean = std = 0.5: [-1, 1] as it is
    assert m['layer_norm_eps'] == 1e-6 and meta['hf_model_type'] == 'siglip_vision_model'


@pytest.mark.parametrize('tower,hw', [('clip', (48, 40)), ('siglip', (24, 24))])
def test_other_resolutions_match_hf_interpolate_pos_encoding(tower, hw, request):
    model, _, dst = request.getfixturevalue(tower)
    x = images(*hw, seed=1)
    hidden, pooled = hf_run(model, x, interpolate=True)
    aux = load_vit(dst)[0](x)
    np.testing.assert_allclose(aux['tokens'], hidden, **TOL)
    np.testing.assert_allclose(aux['pooled'], pooled, **TOL)
    if tower == 'clip':  # the kernel matters: a bilinear resize of the same grid gives other features
        bilinear = load_vit(dst, posemb_resize='bilinear')[0](x)
        assert np.abs(bilinear['tokens'] - hidden).max() > 1e-3


def test_bicubic_resize_is_torch_interpolate():
    grid = np.random.default_rng(2).normal(size=(5, 5, 8)).astype(np.float32)
    for new in [(8, 7), (3, 4), (2, 9)]:
        want = torch.nn.functional.interpolate(
            torch.from_numpy(grid.transpose(2, 0, 1))[None], size=new, mode='bicubic', align_corners=False
        )[0].numpy()
        got = np.asarray(resize_posemb(grid, new, 'bicubic')).reshape(*new, 8)
        np.testing.assert_allclose(got, want.transpose(1, 2, 0), atol=1e-5)
    np.testing.assert_allclose(_torch_bicubic_matrix(5, 5), np.eye(5), atol=1e-12)
    assert resize_posemb(grid, (5, 5), 'bicubic').shape == (25, 8)


def test_full_clip_folder_via_cli(tmp_path):
    config = tr.CLIPConfig(vision_config=VISION, text_config=TEXT, projection_dim=16)
    model = save_random(tr.CLIPModel(config), tmp_path / 'hf')
    proc = run_mmjax('convert', 'hf-import', str(tmp_path / 'hf'), str(tmp_path / 'mm'))
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out['wrote'] == str(tmp_path / 'mm') and out['hf_model_type'] == 'clip' and out['kind'] == 'vit'
    run, _ = load_vit(tmp_path / 'mm')
    x = images(32, 32, seed=3)
    hidden, pooled = hf_run(model.vision_model, x)
    aux = run(x)
    np.testing.assert_allclose(aux['tokens'], hidden, **TOL)
    np.testing.assert_allclose(aux['pooled'], pooled, **TOL)


def test_full_siglip_folder(tmp_path):
    model = save_random(
        tr.SiglipModel(tr.SiglipConfig(vision_config=VISION, text_config=TEXT)), tmp_path / 'hf'
    )
    meta = hf.hf_import(str(tmp_path / 'hf'), str(tmp_path / 'mm'))
    assert meta['hf_model_type'] == 'siglip' and meta['hf_config']['model_type'] == 'siglip_vision_model'
    x = images(32, 32, seed=4)
    hidden, pooled = hf_run(model.vision_model, x)
    aux = load_vit(tmp_path / 'mm')[0](x)
    np.testing.assert_allclose(aux['tokens'], hidden, **TOL)
    np.testing.assert_allclose(aux['pooled'], pooled, **TOL)


def edited_copy(src, dst, config=None, tensors=None):
    """A copy of the HF folder `src` with config.json updated by `config` and tensors by `tensors(dict)`."""
    os.makedirs(dst)
    cfg = json.load(open(os.path.join(src, 'config.json')))
    json.dump({**cfg, **(config or {})}, open(os.path.join(dst, 'config.json'), 'w'))
    weights = load_file(os.path.join(src, 'model.safetensors'))
    save_file(tensors(weights) if tensors else weights, os.path.join(dst, 'model.safetensors'))
    return str(dst)


def test_transformers4_prefixed_vision_folder(clip, tmp_path):
    _, src, dst = clip
    prefixed = edited_copy(
        src, tmp_path / 'v4', tensors=lambda w: {f'vision_model.{k}': v for k, v in w.items()}
    )
    hf.hf_import(prefixed, str(tmp_path / 'mm'))
    want, got = weights.load(str(dst))[0], weights.load(str(tmp_path / 'mm'))[0]
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_mismatched_folders_fail_clearly(clip, siglip, tmp_path):
    _, clip_src, _ = clip
    _, siglip_src, _ = siglip
    unknown = edited_copy(clip_src, tmp_path / 'unknown', config={'model_type': 'vit_mae'})
    with pytest.raises(hf.ConversionError, match="model_type 'vit_mae'.*not supported"):
        hf.hf_import(unknown, str(tmp_path / 'out'))
    wider = edited_copy(clip_src, tmp_path / 'wider', config={'hidden_size': 64})
    with pytest.raises(hf.ConversionError, match=r"do not fit.*embedding/kernel: \(192, 32\).*\(192, 64\)"):
        hf.hf_import(wider, str(tmp_path / 'out'))
    no_probe = edited_copy(
        siglip_src, tmp_path / 'no_probe', tensors=lambda w: {k: v for k, v in w.items() if k != 'head.probe'}
    )
    with pytest.raises(hf.ConversionError, match="'head.probe' is missing"):
        hf.hf_import(no_probe, str(tmp_path / 'out'))
    as_clip = edited_copy(siglip_src, tmp_path / 'as_clip', config={'model_type': 'clip_vision_model'})
    with pytest.raises(hf.ConversionError, match="'embeddings.class_embedding' is missing"):
        hf.hf_import(as_clip, str(tmp_path / 'out'))
    assert not os.path.exists(tmp_path / 'out')


def test_uint8_images_through_the_hf_image_processor_match(clip, tmp_path):
    """What a user feeds: uint8 pixels. HF: its image processor (rescale, normalise) then the tower;
    mmjax: x / 127.5 - 1 then the imported tower, whose `pixels` came from preprocessor_config.json."""
    model, src, _ = clip
    processor = tr.CLIPImageProcessorPil(do_resize=False, do_center_crop=False)
    folder = edited_copy(src, tmp_path / 'hf')
    processor.save_pretrained(folder)
    hf.hf_import(folder, str(tmp_path / 'mm'))
    run, meta = load_vit(tmp_path / 'mm')
    assert meta['model']['pixels'] == 'clip'
    raw = np.random.default_rng(5).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    pixel_values = processor(images=list(raw), return_tensors='np')['pixel_values']
    with torch.no_grad():
        want = model(pixel_values=torch.from_numpy(pixel_values)).last_hidden_state.numpy()
    np.testing.assert_allclose(run(raw.astype(np.float32) / 127.5 - 1)['tokens'], want, **TOL)
    unsigned = load_vit(tmp_path / 'mm', pixels='signed')[0](raw.astype(np.float32) / 127.5 - 1)
    assert np.abs(unsigned['tokens'] - want).max() > 1e-2  # the renormalisation is what makes them agree


def test_image_processor_statistics_choose_the_preset_or_fail(clip, tmp_path):
    _, src, _ = clip
    for name, processor, want in (
        ('siglip', tr.SiglipImageProcessorPil(), 'signed'),
        (
            'imagenet',
            tr.CLIPImageProcessorPil(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]),
            'imagenet',
        ),
    ):
        folder = edited_copy(src, tmp_path / name)
        processor.save_pretrained(folder)
        assert hf.hf_import(folder, str(tmp_path / f'{name}_mm'))['model']['pixels'] == want
    odd = edited_copy(src, tmp_path / 'odd')
    tr.CLIPImageProcessorPil(image_mean=[0.4, 0.4, 0.4], image_std=[0.2, 0.2, 0.2]).save_pretrained(odd)
    with pytest.raises(
        hf.ConversionError, match=r"image_mean=\[0.4, 0.4, 0.4\].*presets signed, clip, imagenet"
    ):
        hf.hf_import(odd, str(tmp_path / 'odd_mm'))
    assert not os.path.exists(tmp_path / 'odd_mm')


def test_mm1_takes_an_imported_clip_tower_only_as_the_config_describes_it(tmp_path):
    """configs/mm1.py:tiny's ViT shapes as a CLIP tower: the recipe names every architecture field
    (the pixel statistics included) the config gets wrong, and builds once the config states them."""
    from mmjax import config as config_lib
    from mmjax.recipes import mm1

    shapes = dict(
        image_size=32,
        patch_size=4,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    save_random(tr.CLIPVisionModel(tr.CLIPVisionConfig(**shapes)), tmp_path / 'hf')
    meta = hf.hf_import(str(tmp_path / 'hf'), str(tmp_path / 'clip'))
    cfg = config_lib.load(
        os.path.join(ROOT, 'configs', 'mm1.py:tiny'), [f'init.vision.path={tmp_path / "clip"}']
    )
    with pytest.raises(
        config_lib.ConfigError,
        match=r"init.vision: .* is a ViT with .*pixels='clip'.* but model.vision has .*pixels='signed'",
    ):
        mm1.Recipe(cfg)
    with cfg.unlocked():
        cfg.model.vision.update(
            {
                k: meta['model'][k]
                for k in (
                    'pixels',
                    'class_token',
                    'pre_norm',
                    'act',
                    'layer_norm_eps',
                    'patch_bias',
                    'posemb_resize',
                )
            }
        )
    recipe = mm1.Recipe(cfg)
    assert recipe.model.vision.pixels == 'clip'
