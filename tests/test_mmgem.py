"""MM-GEM: [EMB] embeddings, both objectives in one step, the logit scale's clamp, LAMB's decay
mask, stage 2 changing only its own parameters, the same losses on 8 devices as on 1, and the
full scale compiling abstractly."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import read_metrics, run_mmjax

from mmjax import config as config_lib, recipes, tree, weights
from mmjax.config import ConfigError
from mmjax.data import pipeline
from mmjax.models import mmgem
from mmjax.train import optim, trainer as trainer_lib

CONFIG = "configs/mmgem.py"


def load(variant="tiny_stage1", *overrides):
    return config_lib.load(f"{CONFIG}:{variant}", list(overrides))


@pytest.fixture(scope="module")
def tiny():
    cfg = load()
    recipe = recipes.get(cfg)
    params = nn.unbox(jax.jit(recipe.init)(jax.random.key(0)))["params"]
    return cfg, recipe, params


def test_emb_embedding_is_read_at_each_rows_own_emb_token_with_either_padding(tiny):
    cfg, recipe, params = tiny
    pre = recipe.preprocess("pairs")
    texts = ["a red circle", "two small blue squares above a large green triangle", "a cyan square"]
    right = np.stack([pre.text(t)["emb_tokens"] for t in texts])
    mask_r = np.stack([pre.text(t)["emb_mask"] for t in texts])
    n = mask_r.sum(1)
    left = np.stack([np.roll(r, len(r) - k) for r, k in zip(right, n)])  # the same tokens, padding first
    mask_l = np.stack([np.roll(m, len(m) - k) for m, k in zip(mask_r, n)])
    assert (left[:, -1] == recipe.emb_id).all() and not mask_l[:, 0].all()
    embed = jax.jit(
        lambda p, t, m: recipe.model.apply({"params": p}, t, m, method=mmgem.MMGEM.text_embedding)
    )
    a, b = np.asarray(embed(params, right, mask_r)), np.asarray(embed(params, left, mask_l))
    np.testing.assert_allclose(a, b, atol=2e-5)
    # the hidden state at [EMB], not at the last position: moving [EMB] earlier changes the result
    cut = right.copy()
    cut[0, n[0] - 1], cut[0, n[0] - 2] = cut[0, n[0] - 2], recipe.emb_id
    c = np.asarray(embed(params, cut, mask_r))
    assert np.abs(c[0] - a[0]).max() > 1e-3 and np.allclose(c[1:], a[1:], atol=1e-6)
    assert len({tuple(np.round(x, 4)) for x in a}) == 3  # distinct texts, distinct embeddings


def test_one_step_takes_both_objectives_and_the_scale_stays_clamped(tiny):
    cfg, recipe, params = tiny
    batch = pipeline.first_batch(pipeline.train_dataset(cfg, recipe.preprocess, None))
    ctx = None
    (total, metrics), grads = jax.jit(jax.value_and_grad(lambda p: recipe.loss(p, batch, ctx), has_aux=True))(
        params
    )
    emb, gen = float(metrics["emb_loss"]), float(metrics["gen_loss"].value())
    assert np.isclose(float(total), emb + gen, rtol=1e-6)  # L = L_emb + L_gen, unweighted
    assert np.isclose(emb, np.log(cfg.data.global_batch_size), rtol=0.2)  # fresh: near log B
    assert np.isclose(float(metrics["logit_scale"]), 1 / 0.07, rtol=1e-5)
    flat = tree.flat(grads)
    for name in ("h1/kernel", "h2/kernel", "h3/kernel", "logit_scale", "vision/embedding/kernel"):
        assert np.abs(np.asarray(flat[name])).max() > 0, name  # both paths reach their parameters
    assert not np.asarray(flat["h4/kernel"]).any()  # h4 is stage 2's
    big = {**params, "logit_scale": jnp.float32(9.0)}
    assert float(recipe.constrain(big, ctx)["logit_scale"]) == pytest.approx(np.log(100))
    assert float(recipe.constrain(params, ctx)["logit_scale"]) == pytest.approx(np.log(1 / 0.07))


def test_lamb_groups_and_decay_mask():
    """Backbones at 0.1x the projections' rate (full scale: 5e-5 against 5e-4); no weight decay on
    norms, biases or the logit scale; h4 frozen in stage 1 (no optimizer state)."""
    cfg = load("l14_stage1")
    assert cfg.optim.name == "lamb" and cfg.optim.lr == 5e-4 and cfg.optim.weight_decay == 0.05
    t = trainer_lib.Trainer(load(), "")
    assert not any(n.startswith("h4/") for n in t.opt.trainable)
    groups = t.opt.groups
    assert {groups[n] for n in groups if n.startswith(("h1/", "h2/", "h3/"))} == {"default"}
    names = tree.flat(t.abstract_params)
    opt = optim.build(cfg.optim, names, 10)  # the full scale's groups on the tiny tree
    assert {opt.groups[n] for n in names if n.startswith(("vision/", "llm/"))} == {"group_0"}
    assert {g for n, g in opt.groups.items() if not n.startswith(("vision/", "llm/"))} == {"default"}
    params = {n: jnp.ones(a.shape, a.dtype) for n, a in names.items() if n in opt.trainable}
    zero = jax.tree.map(jnp.zeros_like, params)

    @jax.jit
    def second_update(params):  # step 0's warm-up learning rate is 0; zero gradients: only decay moves
        _, state = opt.tx.update(zero, opt.tx.init(params), params)
        return opt.tx.update(zero, state, params)[0]

    updates = second_update(params)
    decayed = {n for n, u in updates.items() if np.abs(np.asarray(u)).max() > 0}
    assert "logit_scale" not in decayed and not any(n.endswith(("bias", "scale")) for n in decayed)
    assert {"h1/kernel", "h3/kernel", "llm/embedder/embedding"} <= decayed


def test_bad_configs_fail_before_compilation():
    with pytest.raises(ConfigError, match="grad_accum"):
        recipes.get(load("tiny_stage1", "train.grad_accum=2"))
    with pytest.raises(ConfigError, match="tasks"):
        recipes.get(load("tiny_stage1", "tasks=('embed', 'captions')"))
    with pytest.raises(ConfigError, match="soft_prompts"):
        recipes.get(load("tiny", "region_caption.model.soft_prompts=0").region_caption)
    with pytest.raises(ConfigError, match="evals.retrieval.task"):
        recipes.get(load("tiny_stage1", "evals.retrieval.task=retreival"))


@pytest.mark.long(2)
def test_train_logs_the_same_losses_on_8_devices_as_on_1(tmp_path):
    args = [
        "train",
        "--config",
        f"{CONFIG}:tiny_stage1",
        "--config.train.steps=4",
        "--config.train.log_every=1",
    ]
    args += ["--config.evals={}", "--config.train.save_every=4", "--config.data.global_batch_size=16"]
    args += ["--config.model.vision.depth=1", "--config.model.llm.depth=1"]  # the sharding is what is tested
    runs = {}
    for devices in (1, 8):
        run_mmjax(*args, "--workdir", str(tmp_path / str(devices)), devices=devices)
        runs[devices] = read_metrics(tmp_path / str(devices))
    for step in range(1, 5):
        for key in ("loss", "emb_loss", "gen_loss", "grad_norm"):
            assert runs[8][step][key] == pytest.approx(runs[1][step][key], rel=2e-4, abs=1e-5), (step, key)
    assert runs[1][4]["loss"] < runs[1][1]["loss"]


def test_full_scale_compiles_abstractly_on_fake_devices():
    """ViT-L/14 + a TinyLlama-shaped LLM, global batch 81,920 over 8 fake devices (data x fsdp)."""
    from mmjax import cli

    cfg = load("l14_stage1", "mesh.fsdp=8")
    assert cfg.data.global_batch_size == 81_920 and cfg.model.text_len == 50
    info = cli.check(cfg)  # validates, builds abstractly and compiles the train step
    assert (
        1.2e9 < info["params"] < 1.35e9
    )  # ViT-L/14 (0.30B) + TinyLlama's body over the shapes vocabulary (0.97B)
    assert info["argument_bytes"] > 0 and info["mesh"]["fsdp"] == 8


def test_retrieval_scores_count_any_matching_text_as_a_hit():
    from mmjax.eval import retrieval

    ids = np.array([[1, 2], [3, 4], [1, 2], [5, 6]])  # images 0 and 2 share a caption
    texts = np.eye(4)[[0, 1, 0, 3]]  # one direction per distinct text
    images = texts.copy()
    images[3] = texts[1]  # image 3 looks like text 1's images
    s = retrieval.image_text(images, texts, ids, ks=(1, 2))
    assert s["i2t_R@1"] == 0.75 and s["i2t_R@2"] == 0.75  # image 3's own text is not in its top 2
    # text queries (3 distinct): [1 2] finds image 0 or 2, [3 4] image 1 (image 3 ties: order), [5 6] nothing near
    assert s["t2i_R@1"] == pytest.approx(2 / 3) and s["t2i_R@2"] == pytest.approx(2 / 3)
    rel = np.array([[False, True, False]])
    assert retrieval.recall_at_k(np.array([[0.9, 0.8, 0.1]]), rel, (1, 2)) == {"R@1": 0.0, "R@2": 1.0}


def test_evaluators_finalize_perfect_embeddings_to_perfect_scores(tiny):
    cfg, recipe, _ = tiny
    _, finalize = recipe._eval_retrieval(cfg.evals.retrieval)
    ids = np.array([[1, 5, 0], [1, 6, 5], [1, 5, 0], [1, 7, 5]])
    emb = np.eye(4)[[0, 1, 0, 2]]
    out = finalize({"v": emb, "t": emb, "ids": ids, "images": np.zeros((4, 32, 32, 3), np.uint8)})
    assert all(out[f"{d}_R@1"] == 1.0 for d in ("i2t", "t2i"))
    assert len(out["examples"].images) == 3 * 4 and out["examples"].captions[0].endswith("#1 yes")


def test_an_imported_hf_llm_gets_emb_and_cap_by_a_vocabulary_resize(tmp_path):
    """A tiny HF Llama with its own tokenizer (no [EMB] / [CAP]): the recipe adds both, the imported
    table grows by two rows on load (the old rows kept), and a step's loss is finite."""
    from test_hf_example import _hf_llama

    from mmjax.interop import hf

    hf_dir, ckpt = tmp_path / "llama", tmp_path / "llm"
    vocab = _hf_llama(hf_dir)
    hf.hf_import(str(hf_dir), str(ckpt))
    cfg = load(
        "tiny_stage1", f"model.tokenizer={hf_dir}", f"init.llm.path={ckpt}", "data.global_batch_size=8"
    )
    t = trainer_lib.Trainer(cfg, str(tmp_path / "run"))
    assert (t.recipe.emb_id, t.recipe.cap_id) == (vocab, vocab + 1)
    state = t.init_state()
    table = np.asarray(tree.flat(state.params)["llm/embedder/embedding"])
    stored = tree.flat(weights.load(str(ckpt))[0])["embedder/embedding"]
    assert table.shape[0] == vocab + 2 and np.array_equal(table[:vocab], stored)
    batch = pipeline.first_batch(pipeline.train_dataset(cfg, t.recipe.preprocess, None))
    assert (batch["emb_tokens"] == vocab).sum(1).tolist() == [1] * 8  # one [EMB] per row
    loss, _ = jax.jit(t.recipe.loss)(state.params, batch, None)
    assert np.isfinite(float(loss))


def test_captions_are_scored_against_the_worlds_scenes_whatever_the_run_seed():
    """The evaluation images are the shapes world's (its `seed`, default 0), not the run seed's: the
    true captions score 1.0 under seed 1 too."""
    from mmjax.data import shapes

    recipe = recipes.get(load("tiny_stage1", "seed=1"))
    spec = recipe.config.evals.captioning
    _, finalize = recipe._eval_captioning(spec)
    val = shapes.ShapesSource("val", "caption")
    pre = recipe.preprocess("pairs")
    ids = np.stack([pre.text(val[i]["text"])["cap_targets"] for i in range(8)])
    out = finalize({"ids": ids, "truth": ids, "index": np.arange(8)})
    assert out["accuracy"] == 1.0 and out["cider_d"] > 0
