"""The recipe contract (tests/toy_recipe.py uses every piece): non-gradient model state from
additive statistics, the step in the loss and hooks, a constraint after each update, frozen
models, evaluators that make images with an RNG, and `mmjax sample` feeding shapes-eval."""

import json
import itertools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import ROOT, run_mmjax
from mmjax import config as config_lib, tree, weights
from mmjax.config import ConfigError
from mmjax.data import pipeline
from mmjax.train import trainer as trainer_lib
from tests import toy_recipe

TOY = os.path.join(ROOT, "tests", "toy_recipe.py")


def load(*overrides):
    return config_lib.load(TOY, list(overrides))


def _batch(trainer, step=0):
    ds = pipeline.train_dataset(trainer.config, trainer.recipe.preprocess)
    return jax.device_get(next(itertools.islice(ds, step, None)))


def _on_one_device(x):
    return jax.device_put(x, jax.devices()[0])


def test_model_state_sharded_updated_and_equal_to_one_device(tmp_path):
    trainer = trainer_lib.Trainer(load("mesh.data=2", "mesh.fsdp=4", "train.ema_decay=0.5"), str(tmp_path))
    state = trainer.init_state()
    sums = state.model_state["stats"]["sums"]
    assert sums.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp") and sums.shape == (
        toy_recipe.K,
        toy_recipe.D,
    )
    # the optimizer, weight decay and the parameter EMA never see the non-gradient state
    assert set(trainer.opt.trainable) == set(tree.flat(state.params)) - {"centroids"} and set(state.ema) == set(
        trainer.opt.trainable
    )
    opt_shapes = {x.shape for x in jax.tree.leaves(state.opt_state)}
    assert (toy_recipe.K,) not in opt_shapes and (toy_recipe.K, toy_recipe.D) not in opt_shapes

    compiled = trainer.compile_step(trainer.abstract_batch(_batch(trainer)))
    initial = jax.device_get(state)
    one_state = jax.tree.map(_on_one_device, initial)
    reference = jax.jit(trainer.train_step)  # the same step on a single device, no mesh
    s8, s1 = state, one_state
    for step in range(3):
        batch = _batch(trainer, step)
        s8, m8 = compiled(s8, {}, jax.device_put(batch, trainer.batch_sharding))
        s1, m1 = reference(s1, {}, jax.tree.map(_on_one_device, batch))
        assert float(m8["step_seen"]) == step  # the step reaches the loss
        for a, b in ((s8.model_state, s1.model_state), (s8.params, s1.params)):
            jax.tree.map(
                lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5),
                a,
                b,
            )
        if step == 0:  # decay 0.5 at step 0 (a schedule in the hook): counts move halfway to the batch's
            counts = np.asarray(s8.model_state["stats"]["counts"])
            assert counts.sum() == pytest.approx(
                0.5 * toy_recipe.K + 0.5 * trainer.config.data.global_batch_size
            )
            assert float(m8["examples"]) == 16.0  # a Sum metric
    assert not np.allclose(np.asarray(s8.model_state["stats"]["sums"]), initial.model_state["stats"]["sums"])


def test_a_skipped_step_changes_no_state(tmp_path):
    trainer = trainer_lib.Trainer(load(), str(tmp_path))
    state = trainer.init_state()
    bad = _batch(trainer)
    bad["x"] = bad["x"] * np.nan
    before = jax.device_get((state.params, state.model_state))
    state, metrics = jax.jit(trainer.train_step)(state, {}, bad)
    assert int(metrics["skipped"]) == 1
    jax.tree.map(np.testing.assert_array_equal, before, jax.device_get((state.params, state.model_state)))


def test_constraint_applies_after_every_update(tmp_path):
    trainer = trainer_lib.Trainer(load(), str(tmp_path))
    state = trainer.init_state()
    state = state.replace(params={**state.params, "scale": jnp.float32(5.0)})
    step = jax.jit(trainer.train_step)
    for i in range(2):
        state, _ = step(state, {}, _batch(trainer, i))
        assert float(state.params["scale"]) <= toy_recipe.SCALE_MAX + 1e-7


def test_recipe_written_parameter_follows_the_new_state_without_optimizer(tmp_path):
    trainer = trainer_lib.Trainer(load(), str(tmp_path))
    assert "centroids" not in trainer.opt.trainable  # fixed_params: no gradient step, no optimizer state
    state = trainer.init_state()
    step = jax.jit(trainer.train_step)
    for i in range(2):
        state, _ = step(state, {}, _batch(trainer, i))
        stats = jax.device_get(state.model_state["stats"])  # the state this very step made
        np.testing.assert_allclose(
            np.asarray(state.params["centroids"]), stats["sums"] / stats["counts"][:, None], rtol=1e-6
        )


def _body_folder(path, seed):
    trainer = trainer_lib.Trainer(load(f"seed={seed}"), "")
    flat = tree.flat(jax.device_get(trainer.init_state().params))
    weights.save(
        path,
        tree.unflat({n[len("body/") :]: v for n, v in flat.items() if n.startswith("body/")}),
        {"kind": "toy_body"},
    )
    return {n: v for n, v in flat.items() if n.startswith("body/")}


def _with_frozen(cfg, path):
    with cfg.unlocked():
        cfg.frozen.body = ml_collections.ConfigDict(dict(path=str(path), into="body", dtype="bfloat16"))
    return cfg


def test_frozen_model(tmp_path):
    body = _body_folder(tmp_path / "body", seed=5)
    workdir = str(tmp_path / "run")
    cfg = _with_frozen(load(), tmp_path / "body")
    trainer = trainer_lib.Trainer(cfg, workdir)
    everything = trainer_lib.Trainer(load(), "").num_params
    assert trainer.num_params == everything - sum(v.size for v in body.values())  # not counted by lr_law
    assert not any(n.startswith("body/") for n in trainer.opt.trainable)
    fresh = tree.flat(jax.device_get(trainer.init_state().params))
    assert not any(n.startswith("body/") for n in fresh)  # not in the train state at all

    final = trainer_lib.train(cfg, workdir)
    assert np.isfinite(final["loss"])
    state, frozen, info, step = trainer.latest()
    assert step == 6 and not any(n.startswith("body/") for n in tree.flat(state.params))  # not checkpointed
    for n, v in body.items():  # held in its own dtype, bit-identical to the folder
        assert frozen[n].dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(frozen[n]), np.asarray(jnp.asarray(v, jnp.bfloat16)))
    # gradients flowed through the frozen body into the layer before it
    trained = tree.flat(jax.device_get(state.params))
    assert not np.allclose(trained["embed/kernel"], fresh["embed/kernel"])

    out = trainer.export(str(tmp_path / "export"))
    assert out["step"] == 6
    assert not any(n.startswith("body/") for n in weights.stored(tmp_path / "export"))
    assert (
        weights.read_meta(tmp_path / "export")["frozen"]["body"]["fingerprint"] == info["body"]["fingerprint"]
    )

    _body_folder(tmp_path / "other", seed=6)
    other = _with_frozen(load("train.steps=8"), tmp_path / "other")
    with pytest.raises(ConfigError, match="holds other weights"):
        trainer_lib.train(other, workdir)


def test_evaluator_artefacts_and_fixed_rng(tmp_path):
    workdir = tmp_path / "run"
    trainer_lib.train(load(), str(workdir))
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    ev = [r for r in rows if "val/mse" in r][-1]
    assert ev["val/samples"] == "eval/step_6/val/samples.png" and (workdir / ev["val/samples"]).is_file()
    assert (workdir / "loss.png").is_file()
    trainer = trainer_lib.Trainer(load(), str(workdir))
    state, frozen, _, _ = trainer.latest()
    a, b = trainer.evaluate(state, frozen), trainer.evaluate(state, frozen)
    assert (
        a["val/noise"] == b["val/noise"] and 0.3 < a["val/noise"] < 0.7
    )  # uniform noise from the evaluator's RNG
    assert a["val/mse"] == pytest.approx(ev["val/mse"], rel=1e-6)


def test_sample_cli_writes_what_shapes_eval_scores(tmp_path):
    workdir = str(tmp_path / "run")
    run_mmjax("train", "--config", TOY, "--workdir", workdir, "--config.train.steps=2", "--config.evals={}")
    prompts = tmp_path / "prompts.jsonl"
    run_mmjax("--write-prompts", "2", str(prompts), module="mmjax.eval.shapes_eval")
    out = tmp_path / "samples"
    proc = run_mmjax(
        "sample",
        "--config",
        TOY,
        "--workdir",
        workdir,
        "--prompts",
        str(prompts),
        "--num-samples",
        "2",
        "--out",
        str(out),
        "--config.evals={}",
    )
    assert json.loads(proc.stdout.strip().splitlines()[-1])["images"] == 24
    index = [json.loads(line) for line in open(out / "index.jsonl")]
    assert len(index) == 24 and all((out / r["file"]).is_file() for r in index)
    run_mmjax(
        "--images",
        str(out),
        "--prompts",
        str(out / "index.jsonl"),
        "--out",
        str(tmp_path / "score.json"),
        module="mmjax.eval.shapes_eval",
    )
    assert (
        json.load(open(tmp_path / "score.json"))["overall"] == 1.0
    )  # the oracle sampler's images, all 24 scored
    vit = run_mmjax(
        "sample",
        "--config",
        os.path.join(ROOT, "configs", "vit_shapes.py:tiny"),
        "--workdir",
        workdir,
        "--prompt",
        "a red circle",
        "--out",
        str(out),
        check=False,
    )
    assert vit.returncode == 2 and vit.stderr.strip().splitlines()[-1] == (
        "mmjax: config error: recipe 'vit_shapes' has no sampler (`mmjax sample` needs one)"
    )


def test_pipeline_stage_holds_an_earlier_stage_frozen(tmp_path):
    from mmjax.train import stages

    cfg = config_lib.load(f"{TOY}:pipeline", ["a.evals={}", "b.evals={}"])
    stages.train(cfg, str(tmp_path))
    exported, meta = weights.load(tmp_path / "a" / "export_body")
    assert meta["kind"] == "toy_body" and set(tree.flat(exported)) == {"dense/kernel", "dense/bias"}
    trained_a = tree.flat(jax.device_get(trainer_lib.Trainer(cfg.a, str(tmp_path / "a")).latest()[0].params))
    b = stages.stage_config(cfg, "b", str(tmp_path))
    state, frozen, info, _ = trainer_lib.Trainer(b, str(tmp_path / "b")).latest()
    assert info["body"]["path"].endswith("a/export_body") and "body" not in state.params
    for n in ("body/dense/kernel", "body/dense/bias"):
        np.testing.assert_array_equal(
            np.asarray(frozen[n]), np.asarray(jnp.asarray(trained_a[n], jnp.bfloat16))
        )
    plotted = run_mmjax("plot", str(tmp_path / "b"))
    assert plotted.stdout.strip().endswith("loss.png") and (tmp_path / "b" / "loss.png").is_file()
