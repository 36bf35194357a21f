"""Gradient accumulation is the full batch: on packed MM1 rows whose micro-batches hold unequal
numbers of text tokens, the token-normalised loss, its gradients and the count and
per-component metrics equal one full-batch step's (fp32 tolerance)."""

import os

import jax
import numpy as np
import pytest

from mmjax import config as config_lib, parallel, tree
from mmjax.data import pipeline
from mmjax.recipes.base import Context
from mmjax.train import trainer as trainer_lib

MM1 = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "mm1.py:tiny")
DATA = [f"data.components.{n}.num_records=256" for n in ("caption", "interleaved", "text")]


def _grads(accum, shared=None):
    """`shared`: the (state, local batch) of another accumulation's trainer; grad_accum enters
    neither the initial state nor the data, so both steps start from the same arrays (one init)."""
    cfg = config_lib.load(
        MM1, ["data.global_batch_size=32", f"train.grad_accum={accum}", "train.steps=2", *DATA]
    )
    trainer = trainer_lib.Trainer(cfg, "")
    if shared is None:
        state = trainer.init_state()
        local = pipeline.first_batch(
            pipeline.train_dataset(cfg, trainer.recipe.preprocess, trainer.recipe.packing())
        )
    else:
        state, local = shared
    batch = parallel.global_batch(local, trainer.batch_sharding)
    flat = tree.flat(state.params)
    ctx = Context(rng=jax.random.key(0), step=state.step, state=state.model_state)
    with trainer._context():
        loss, metrics, _, grads = jax.jit(trainer._loss_and_grads)(flat, {}, batch, ctx)
    return (state, local), float(loss), jax.device_get(metrics), jax.device_get(grads)


def test_accumulated_step_equals_the_full_batch():
    shared, loss1, m1, g1 = _grads(1)
    _, loss4, m4, g4 = _grads(4, shared)
    local = shared[1]
    # the micro-batches (rows i, i+4, ...: the strided split) really differ in text tokens
    mask = local["loss_mask"] * (local["tokens_segment_ids"] > 0)
    per_micro = [mask[i::4].sum() for i in range(4)]
    assert len(set(per_micro)) > 1, per_micro
    assert loss4 == pytest.approx(loss1, rel=1e-5)
    assert float(m4["tokens"]) == float(m1["tokens"]) == mask.sum()  # a count is a sum, not a mean
    for name in ("caption", "interleaved", "text"):
        assert float(m4[f"tokens/{name}"]) == float(m1[f"tokens/{name}"])
        assert float(m4[f"loss/{name}"]) == pytest.approx(float(m1[f"loss/{name}"]), rel=1e-5)
    norm = np.sqrt(sum(float((g**2).sum()) for g in jax.tree.leaves(g1)))
    assert np.sqrt(sum(float((g**2).sum()) for g in jax.tree.leaves(g4))) == pytest.approx(norm, rel=1e-5)
    for n in g1:
        np.testing.assert_allclose(g4[n], g1[n], rtol=1e-4, atol=1e-7 * norm, err_msg=n)
