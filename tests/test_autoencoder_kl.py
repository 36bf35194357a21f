"""The mmjax AutoencoderKL imported from a diffusers folder matches diffusers (PyTorch CPU), fp32."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mmjax import weights
from mmjax.interop import ConversionError, hf
from mmjax.models import autoencoder_kl

CONFIG = dict(
    block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=16,
    scaling_factor=0.5,
    shift_factor=0.1,
)
TOL = 1e-4


@pytest.fixture(scope='module')
def vae(tmp_path_factory):
    """(torch model, mmjax module, params, meta) of a random diffusers AutoencoderKL."""
    from diffusers import AutoencoderKL

    src, dst = tmp_path_factory.mktemp('vae_diffusers'), tmp_path_factory.mktemp('vae_mmjax')
    torch.manual_seed(0)
    model = AutoencoderKL(**CONFIG).float().eval()
    with torch.no_grad():  # no zero biases or unit norm scales survive
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(src), safe_serialization=True)
    assert json.load(open(src / 'config.json'))['_class_name'] == 'AutoencoderKL'
    hf.hf_import(str(src), str(dst))  # what `mmjax convert hf-import SRC DST` runs
    params, meta = weights.load(str(dst))
    return model, autoencoder_kl.from_meta(meta), params, meta


def test_matches_diffusers(vae):
    model, module, params, meta = vae
    assert meta['kind'] == 'autoencoder_kl' and meta['model']['block_out_channels'] == [8, 16]
    x = np.random.default_rng(0).uniform(-1, 1, size=(2, 16, 16, 3)).astype(np.float32)
    z = np.random.default_rng(1).normal(size=(2, 8, 8, 4)).astype(np.float32)
    with torch.no_grad():
        dist = model.encode(torch.from_numpy(x.transpose(0, 3, 1, 2))).latent_dist
        want_image = model.decode(torch.from_numpy(z.transpose(0, 3, 1, 2))).sample.numpy()
    mean, logvar = jax.jit(lambda x: module.apply({'params': params}, x, method='encode'))(x)
    image = jax.jit(lambda z: module.apply({'params': params}, z, method='decode'))(z)
    for got, want in (
        (mean, dist.mean.numpy()),
        (logvar, dist.logvar.numpy()),
        (image, want_image),
    ):
        got = np.asarray(got).transpose(0, 3, 1, 2)
        assert got.shape == want.shape
        assert np.abs(got - want).max() < TOL, np.abs(got - want).max()


def test_latent_scaling_round_trip(vae):
    _, module, params, meta = vae
    x = np.random.default_rng(2).uniform(-1, 1, size=(1, 16, 16, 3)).astype(np.float32)
    low = autoencoder_kl.from_meta(meta, dtype=jnp.bfloat16)

    @jax.jit
    def run(x):
        apply = lambda method, *a: module.apply({'params': params}, *a, method=method)  # noqa: E731
        mean, _ = apply('encode', x)
        z = apply('to_latent', x)
        sample = apply('to_latent', x, jax.random.key(0))
        bf16 = low.apply({'params': params}, z, method='from_latent')
        return mean, z, sample, apply('from_latent', z), apply('decode', mean), bf16

    mean, z, sample, image, want, bf16 = run(x)
    np.testing.assert_allclose(z, (mean - 0.1) * 0.5, atol=1e-6)
    assert sample.shape == z.shape and not np.allclose(sample, z)
    np.testing.assert_allclose(image, want, atol=1e-5)
    assert bf16.dtype == jnp.float32 and bf16.shape == x.shape
    assert np.abs(bf16 - want).max() < 0.1 * np.abs(want).max()


def test_pickle_only_folder_refused(tmp_path):
    (tmp_path / 'config.json').write_text(json.dumps({'_class_name': 'AutoencoderKL', **CONFIG}))
    (tmp_path / 'diffusion_pytorch_model.bin').write_bytes(b'not loaded')
    with pytest.raises(ConversionError, match='pickle'):
        hf.hf_import(str(tmp_path), str(tmp_path / 'out'))
    assert not os.path.exists(tmp_path / 'out')
