"""UniCode stage 1 (recipes/unicode.py): the LLM table is bit-identical after training, the code
-> token-id map is fixed from it, the codebook is the documented blend of the EMA statistics
toward the LLM rows (equal to them once the ramp ends), and 8 devices update it as 1 does."""

import itertools
import os

import jax
import numpy as np
import pytest

from conftest import ROOT
from mmjax import config as config_lib
from mmjax.data import pipeline
from mmjax.models import unicode
from mmjax.objectives import quantization as Q
from mmjax.train import trainer as trainer_lib

CONFIG = os.path.join(ROOT, "configs", "unicode.py")
SMALL = (
    "data.image_size=32",
    "data.global_batch_size=8",
    "data.components.images.num_records=64",
    "model.vq.block_out_channels=(8,8,8)",
    "model.vq.latent_channels=8",
    "model.vq.norm_num_groups=4",
    "model.llm.width=16",
    "model.llm.depth=1",
    "model.llm.num_heads=2",
    "model.llm.num_kv_heads=1",
    "model.llm.mlp_dim=32",
    "model.llm.vocab_size=64",
    "model.num_codes=32",
    "model.codebook.ramp=(0.0,0.5)",
    "train.steps=4",
)


def _trainer(tmp_path, *overrides):
    return trainer_lib.Trainer(config_lib.load(f"{CONFIG}:tiny", [*SMALL, *overrides]), str(tmp_path))


def _batches(trainer, n):
    ds = pipeline.train_dataset(trainer.config, trainer.recipe.preprocess)
    return [jax.device_get(b) for b in itertools.islice(ds, n)]


def _one(x):
    return jax.device_put(x, jax.devices()[0])


def test_language_driven_stage_keeps_the_llm_table_and_blends_toward_it(tmp_path):
    trainer = _trainer(tmp_path, "mesh.data=8")
    assert not any(n.startswith(("llm/", "codebook", "token_ids")) for n in trainer.opt.trainable)
    state = trainer.init_state()
    table0 = np.asarray(jax.device_get(state.params["llm"]["embedder"]["embedding"]))
    compiled = trainer.compile_step(trainer.abstract_batch(_batches(trainer, 1)[0]))
    reference = jax.jit(trainer.train_step)  # the same steps on one device
    s8, s1 = state, jax.tree.map(_one, jax.device_get(state))
    for step, batch in enumerate(_batches(trainer, 4)):
        s8, m8 = compiled(s8, {}, jax.device_put(batch, trainer.batch_sharding))
        s1, m1 = reference(s1, {}, jax.tree.map(_one, batch))
        for a, b in ((s8.model_state, s1.model_state), (s8.params["codebook"], s1.params["codebook"])):
            jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-4, atol=1e-5), a, b)
        np.testing.assert_allclose(float(m8["loss"]), float(m1["loss"]), rtol=1e-4)
        p = jax.device_get(s8.params)
        ids = p["token_ids"]
        np.testing.assert_array_equal(ids, np.asarray(unicode.code_token_ids(table0, 32)))
        rows = table0[ids]
        st = jax.device_get(s8.model_state["stats"])
        n = st["cluster_size"].sum()
        c_ema = st["embed_sum"] / ((st["cluster_size"] + 1e-5) / (n + 32 * 1e-5) * n)[:, None]
        a = float(Q.ramp(step + 1, 0, 2))
        want = (1 - a) * np.asarray(Q.rescale_to(c_ema, rows)) + a * rows
        np.testing.assert_allclose(p["codebook"], want, rtol=1e-4, atol=1e-6)
    # the tokenizer never wrote the LLM's table, not by one bit; at the ramp's end codes = LLM rows
    np.testing.assert_array_equal(
        np.asarray(jax.device_get(s8.params["llm"]["embedder"]["embedding"])), table0
    )
    np.testing.assert_array_equal(np.asarray(jax.device_get(s8.params["codebook"])), table0[ids])
    assert float(m8["psnr"]) > 0 and 0 < float(m8["usage"]) <= 1


def test_frozen_mode_uses_the_llm_rows_and_keeps_no_statistics(tmp_path):
    trainer = _trainer(tmp_path, "model.codebook.mode=frozen")
    state = trainer.init_state()
    assert state.model_state == {}
    step = jax.jit(trainer.train_step)
    for batch in _batches(trainer, 2):
        state, metrics = step(state, {}, batch)
    p = jax.device_get(state.params)
    np.testing.assert_array_equal(p["codebook"], p["llm"]["embedder"]["embedding"][p["token_ids"]])
    assert np.isfinite(float(metrics["loss"]))


def test_bad_codebook_config_fails_before_compiling(tmp_path):
    with pytest.raises(config_lib.ConfigError, match="mode"):
        _trainer(tmp_path, "model.codebook.mode=dual")
    with pytest.raises(config_lib.ConfigError, match="num_codes"):
        _trainer(tmp_path, "model.num_codes=65")
