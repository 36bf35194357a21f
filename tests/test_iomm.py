"""IOMM: masked image modelling, the RQA, the condition path's padding, the frozen MLLM through
training, validation errors, and the trained chain against an untrained generator."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_sources import four_sources

from mmjax.models.iomm import mask_image_tokens
from mmjax.models.rqa import RQA


def test_mask_ratio_is_honoured_on_image_tokens_only():
    B, L, D = 8, 64, 16
    c = jax.random.normal(jax.random.key(0), (B, L, D)) + 3.0  # no zeros by chance
    is_image = jnp.arange(L)[None, :] >= 16  # 16 text tokens, then 48 image tokens
    is_image = jnp.broadcast_to(is_image, (B, L))
    for ratio in (0.0, 0.45, 0.85):
        out = mask_image_tokens(jax.random.key(1), c, is_image, ratio)
        zeroed = (out == 0).all(-1)
        np.testing.assert_array_equal(out[:, :16], c[:, :16])  # text untouched
        assert not np.asarray(zeroed[:, :16]).any()
        share = float(zeroed[:, 16:].mean())
        assert abs(share - ratio) < 0.06, (ratio, share)
        kept = ~zeroed[:, 16:]
        np.testing.assert_array_equal(np.asarray(out[:, 16:])[kept], np.asarray(c[:, 16:])[kept])
    per_el = mask_image_tokens(jax.random.key(2), c, is_image, 0.45, per_element=True)
    zeros = np.asarray(per_el[:, 16:] == 0)
    assert abs(zeros.mean() - 0.45) < 0.03
    assert zeros.all(-1).mean() < 0.01  # elements, not whole tokens
    np.testing.assert_array_equal(per_el[:, :16], c[:, :16])


def test_rqa_appends_queries_and_leaves_the_condition_alone():
    B, L, D, N = 2, 10, 32, 6
    c = jax.random.normal(jax.random.key(0), (B, L, D))
    mask = jnp.arange(L)[None] < jnp.array([[7], [10]])
    rqa = RQA(num_queries=N, num_heads=4)
    params = rqa.init(jax.random.key(1), c, mask)
    out, m = rqa.apply(params, c, mask)
    assert out.shape == (B, L + N, D) and m.shape == (B, L + N)
    np.testing.assert_array_equal(out[:, :L], c)  # appends, never adds to c
    np.testing.assert_array_equal(m[:, :L], mask)
    assert bool(m[:, L:].all())
    # the queries read the condition: another condition, other queries; padded tokens ignored
    other = c.at[:, :3].add(1.0)
    assert not np.allclose(rqa.apply(params, other, mask)[0][:, L:], out[:, L:])
    padded = c.at[0, 7:].set(100.0)
    np.testing.assert_allclose(rqa.apply(params, padded, mask)[0][0, L:], out[0, L:], atol=1e-6)


# ---- the recipe on a frozen MLLM export ------------------------------------------------------
ROOT = __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__)))


def _config(variant="tiny_stage1", *overrides):
    from mmjax import config as config_lib

    return config_lib.load(f"{ROOT}/configs/iomm.py:{variant}", list(overrides))


@pytest.fixture(scope="module")
def mllm_export(tmp_path_factory):
    """A randomly initialised MM1 tiny VLM written as `mmjax export` writes it (kind 'vlm')."""
    import flax.linen as nn

    from mmjax import config as config_lib, weights
    from mmjax.recipes import mm1

    recipe = mm1.Recipe(config_lib.load(f"{ROOT}/configs/mm1.py:tiny"))
    params = nn.unbox(recipe.init(jax.random.key(0))["params"])
    ex = recipe.exports()[""]
    dst = tmp_path_factory.mktemp("mllm") / "export"
    weights.save(str(dst), params, ex.meta, ex.tokenizer)
    return str(dst)


def _recipe(path, *overrides, variant="tiny_stage1"):
    from mmjax.recipes import iomm

    return iomm.Recipe(_config(variant, f"frozen.mllm.path={path}", *overrides))


def test_condition_ignores_padding_and_sees_the_image(mllm_export):
    import flax.linen as nn

    recipe = _recipe(mllm_export)
    params = nn.unbox(recipe.init(jax.random.key(1))["params"])
    tokens, mask = (np.stack([a, a]) for a in recipe.conds.image_only())
    refs = np.random.default_rng(0).integers(0, 256, (2, 1, 32, 32, 3)).astype(np.uint8)
    condition = jax.jit(recipe.condition)
    h, hm = condition(params, tokens, mask, refs)
    n = int(mask[0].sum())
    assert h.shape[1] == recipe.config.model.cond_len + recipe.config.model.adapter.num_queries
    other = tokens.copy()
    other[:, n:] = 7  # padded slots hold other ids: nothing changes where the mask is True
    h2, _ = condition(params, other, mask, refs)
    np.testing.assert_allclose(np.asarray(h2)[np.asarray(hm)], np.asarray(h)[np.asarray(hm)], atol=1e-5)
    h3, _ = condition(params, tokens, mask, refs[::-1])  # another image, another condition
    assert not np.allclose(np.asarray(h3[0, n:]), np.asarray(h[0, n:]), atol=1e-4)


def test_bad_inputs_fail_before_compiling(mllm_export, tmp_path):
    from mmjax import weights
    from mmjax.config import ConfigError
    from mmjax.recipes.base import Context

    wrong = tmp_path / "llm"
    weights.save(str(wrong), {"w": np.zeros(2, np.float32)}, {"kind": "llm", "model": {}})
    with pytest.raises(ConfigError, match="not a VLM export"):
        _recipe(str(wrong))
    recipe = _recipe(mllm_export)
    ctx = Context(rng=jax.random.key(0), step=jnp.int32(0), state={})
    params = None  # every check runs before the model is touched
    with pytest.raises(ConfigError, match="model.cond_len=32"):
        recipe.sample(params, [{"text": "a red circle and a blue square " * 6}], 1, ctx)
    # ... while a training caption that long is cut to fit (a web caption never ends a run)
    from mmjax.recipes import iomm

    example = iomm.Preprocess(recipe.conds, "caption")(
        {"index": 0, "image": np.zeros((32, 32, 3), np.uint8), "text": "a red circle and a blue square " * 6}
    )
    assert example["mask"].all() and example["tokens"].shape == (32,)
    assert recipe.tokenizer.decode(example["tokens"][1:], skip_special_tokens=True).startswith(
        "a red circle and"
    )
    with pytest.raises(ConfigError, match="64x64 px; this model makes 32x32"):
        recipe.sample(params, [{"text": "make it red", "image": np.zeros((64, 64, 3), np.uint8)}], 1, ctx)
    with pytest.raises(ConfigError, match="needs a reference image"):
        recipe.sample(params, [{"text": "make the circle green", "task": "edit"}], 1, ctx)
    with pytest.raises(ConfigError, match="view='edit'"):
        _recipe(mllm_export, "evals.edit.view=caption", variant="tiny_stage2")


def _files(path):
    import hashlib
    import pathlib

    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(pathlib.Path(path).rglob("*"))
        if p.is_file()
    }


@pytest.mark.long
def test_frozen_mllm_trains_the_adapter_on_all_four_real_sources_and_stays_out_of_checkpoints(
    mllm_export, tmp_path
):
    """Stage 1 (image-only) on a mixture of the four real sources, their corrupt images skipped and
    counted; the MLLM gets no optimizer state, stays bit-identical and out of the checkpoints."""
    import json

    from mmjax import config as config_lib, tree, weights
    from mmjax.train import trainer as trainer_lib

    before = _files(mllm_export)
    cfg = _config(
        "tiny_stage1",
        f"frozen.mllm.path={mllm_export}",
        "evals={}",
        "train.steps=3",
        "train.save_every=1",
        "train.log_every=1",
        "data.global_batch_size=8",
        "data.max_skip_rate=0.5",
    )
    with cfg.unlocked():
        cfg.data.components = {
            n: config_lib.component(**c, format="image", view="image")
            for n, c in four_sources(tmp_path).items()
        }
    workdir = str(tmp_path / "run")
    trainer_lib.train(cfg, workdir)
    rows = [json.loads(line) for line in open(f"{workdir}/metrics.jsonl") if '"loss"' in line]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["data/skipped"] > 0
    assert all(np.isfinite(rows[-1][f"loss/{n}"]) for n in ("folder", "wds", "records", "tfds"))
    t = trainer_lib.Trainer(cfg, workdir)
    assert not any(n.startswith("mllm/") for n in tree.flat(t.abstract_params))  # no optimizer state either
    state, frozen, _, step = t.latest()
    assert step == 3 and set(state.params) == {"generator", "rqa"}
    saved = (
        {n for n in tree.flat(state.opt_state) if "mllm" in n} if isinstance(state.opt_state, dict) else set()
    )
    assert not saved
    held, _ = weights.load(mllm_export)
    for n, a in tree.flat(held).items():  # the MLLM the run used is the export, bit for bit
        np.testing.assert_array_equal(np.asarray(frozen["mllm/" + n]), a)
    assert _files(mllm_export) == before
    import orbax.checkpoint as ocp

    restored = ocp.StandardCheckpointer().restore(f"{workdir}/checkpoints/1/state")
    assert not any("mllm" in n for n in tree.flat(restored))


@pytest.mark.long
def test_gradients_reach_the_adapter_through_the_frozen_mllm(mllm_export):
    import flax.linen as nn

    from mmjax import tree
    from mmjax.data import shapes
    from mmjax.recipes.base import Context

    recipe = _recipe(mllm_export)
    params = nn.unbox(recipe.init(jax.random.key(1))["params"])
    leaves, treedef = jax.tree.flatten(params["generator"])  # past the zero-initialised layers
    keys = jax.random.split(jax.random.key(2), len(leaves))
    leaves = [a + 0.02 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)]
    params["generator"] = jax.tree.unflatten(treedef, leaves)
    src, pre = shapes.ShapesSource(view="image", num_records=4), recipe.preprocess("images")
    rows = [pre(src[i]) for i in range(4)]
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]} | {"_component": np.zeros(4, np.int32)}
    ctx = Context(rng=jax.random.key(3), step=jnp.int32(0), state={})
    frozen = {k: v for k, v in params.items() if k == "mllm"}

    def loss(trainable):
        value = recipe.loss({**trainable, **frozen}, batch, ctx)[0]
        return value.total / value.weight

    grads = tree.flat(jax.jit(jax.grad(loss))({k: v for k, v in params.items() if k != "mllm"}))
    for name in ("rqa/queries", "rqa/attn/q/kernel", "generator/proj_out/kernel"):
        g = np.asarray(grads[name])
        assert np.isfinite(g).all() and np.abs(g).max() > 0, name
    # the held-out loss evaluator: noise fixed per example, so any batch order gives the same values
    held = jax.jit(recipe.held_out_loss)
    err = np.asarray(held(params, batch))
    flipped = np.asarray(held(params, {k: v[::-1] for k, v in batch.items()}))[::-1]
    assert err.shape == (4, 8) and (err > 0).all()
    np.testing.assert_allclose(flipped, err, rtol=1e-4)
    assert not np.allclose(err[0], err[1], rtol=1e-3)  # other examples, other draws


def test_the_chain_reuses_a_given_mllm(mllm_export):
    from mmjax.train import stages

    chain = _config("tiny")
    assert chain.stages == ("mllm", "stage1", "stage2") and stages.needed(chain, "mllm")
    assert stages.stage_config(chain, "stage2", "/w").frozen.mllm.path == "/w/mllm/export"
    given = _config(
        "tiny", f"stage1.frozen.mllm.path={mllm_export}", f"stage2.frozen.mllm.path={mllm_export}"
    )
    assert not stages.needed(given, "mllm") and stages.needed(given, "stage1")
    s2 = stages.stage_config(given, "stage2", "/w")
    assert s2.frozen.mllm.path == mllm_export and s2.init.iomm.path == "/w/stage1/export"
    half = _config("tiny", f"stage1.frozen.mllm.path={mllm_export}")  # stage 2 still links to it
    assert stages.needed(half, "mllm")
    from mmjax import config as config_lib  # a linked entry's own default path does not cut the link

    mm1 = config_lib.load(f"{ROOT}/configs/mm1.py:tiny_pipeline")
    assert (
        stages.needed(mm1, "pretrain")
        and stages.stage_config(mm1, "sft", "/w").init.mm1.path == "/w/pretrain/export"
    )


def test_b_scale_builds_abstractly():
    """IOMM-B: a ~1.6B MM-DiT on 512 px latents of FLUX's autoencoder, a 2B-class frozen MLLM,
    batch 1024, AdamW (0.9, 0.95), lr 1e-4, EMA 0.999; nothing is allocated."""
    from mmjax import tree
    from mmjax.train import trainer as trainer_lib

    cfg = _config("b_stage1")
    t = trainer_lib.Trainer(cfg, "")
    sizes = {}
    for n, a in tree.flat(t.abstract_params).items():
        sizes[n.split("/")[0]] = sizes.get(n.split("/")[0], 0) + a.size
    frozen = {
        k: sum(a.size for n, a in t.abstract_frozen.items() if n.startswith(k + "/")) for k in ("mllm", "vae")
    }
    assert 1.4e9 < sizes["generator"] < 1.7e9 and set(sizes) == {"generator", "rqa"}, sizes
    assert 1.5e9 < frozen["mllm"] < 2.5e9 and 50e6 < frozen["vae"] < 120e6, frozen
    assert t.recipe.target_shape() == (64, 64, 16)
    assert cfg.data.global_batch_size == 1024 and cfg.train.ema_decay == 0.999
    assert (cfg.optim.lr, cfg.optim.b2, cfg.optim.weight_decay, cfg.optim.clip_norm) == (1e-4, 0.95, 0.0, 1.0)
