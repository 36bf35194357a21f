"""UniCode stage 1 (recipes/unicode.py): the LLM table is bit-identical after training, the code
-> token-id map is fixed from it, the codebook is the documented blend of the EMA statistics
toward the LLM rows (equal to them once the ramp ends), and 8 devices update it as 1 does."""

import itertools
import json
import os

import jax
import numpy as np
import pytest

from conftest import ROOT, run_mmjax
from mmjax import config as config_lib, tree
from mmjax.data import pipeline
from mmjax.eval import shapes_eval
from mmjax.models import unicode
from mmjax.objectives import quantization as Q
from mmjax.recipes import unicode as unicode_recipe
from mmjax.train import trainer as trainer_lib

CONFIG = os.path.join(ROOT, "configs", "unicode.py")
SMALL = (
    "data.image_size=32",
    "data.global_batch_size=8",
    "data.components.images.num_records=64",
    "model.seq_len=16",
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
    return trainer_lib.Trainer(config_lib.load(f"{CONFIG}:tiny_stage1", [*SMALL, *overrides]), str(tmp_path))


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
        specials = trainer.recipe.specials  # never codes: BOS, EOS, <image>, ...
        np.testing.assert_array_equal(ids, np.asarray(unicode.code_token_ids(table0, 32, specials)))
        assert not set(ids.tolist()) & set(specials)
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
        _trainer(tmp_path, "model.codebook.mode=bogus")
    with pytest.raises(config_lib.ConfigError, match="num_codes"):
        _trainer(tmp_path, "model.num_codes=65")


BIG_VOCAB = ("model.llm.vocab_size=384",)  # stage 2 and the dual mode read text: the tokenizer's 353


def test_dual_mode_alternates_tokenizer_and_llm_steps_both_writing_the_shared_table(tmp_path):
    trainer = _trainer(
        tmp_path, *BIG_VOCAB, "model.codebook.mode=dual", "optim.weight_decay=0.0", "optim.warmup_steps=0"
    )
    assert "llm/embedder/embedding" in trainer.opt.trainable and trainer.init_state().model_state == {}
    step, state = jax.jit(trainer.train_step), trainer.init_state()
    flat = lambda s: {  # noqa: E731
        n: np.asarray(v) for n, v in tree.flat(jax.device_get(s.params)).items()
    }
    before = flat(state)
    (b0, b1) = _batches(trainer, 2)
    state, m0 = step(state, {}, b0)  # step 0: the tokenizer's
    after0 = flat(state)
    ids = after0["token_ids"]
    table0, table1 = before["llm/embedder/embedding"], after0["llm/embedder/embedding"]
    rows = np.zeros(len(table0), bool)
    rows[ids] = True
    assert not np.array_equal(table0[rows], table1[rows])  # the codebook loss wrote the code rows
    np.testing.assert_array_equal(table0[~rows], table1[~rows])  # and nothing else of the table
    for n in before:
        if n.startswith("llm/") and n != "llm/embedder/embedding":
            np.testing.assert_array_equal(before[n], after0[n])  # the LLM did not train
    assert any(not np.array_equal(before[n], after0[n]) for n in before if n.startswith("vq/"))
    np.testing.assert_array_equal(after0["codebook"], table1[ids])
    np.testing.assert_allclose(
        float(m0["loss"]), float(m0["recon_mse"] + m0["commitment"] + m0["codebook_loss"]), rtol=1e-5
    )
    state, m1 = step(state, {}, b1)  # step 1: the LLM's, on the captions
    after1 = flat(state)
    np.testing.assert_allclose(float(m1["loss"]), float(m1["text_loss"]), rtol=1e-5)
    assert not np.array_equal(
        after0["llm/decoder/block_0/attn/q/kernel"], after1["llm/decoder/block_0/attn/q/kernel"]
    )
    np.testing.assert_array_equal(after1["codebook"], after1["llm/embedder/embedding"][ids])


def _stage2(tmp_path, *overrides):
    return trainer_lib.Trainer(
        config_lib.load(
            f"{CONFIG}:tiny_stage2",
            [
                *(o for o in SMALL if "components.images" not in o and "ramp" not in o),
                *BIG_VOCAB,
                "model.seq_len=64",
                "model.vq.block_out_channels=(8,8,8,8)",
                *(f"data.components.{c}.num_records=32" for c in ("caption", "vqa", "t2i", "decompress")),
                *overrides,
            ],
        ),
        str(tmp_path),
    )


def test_stage2_rows_hold_image_embeddings_and_the_frozen_tokenizers_code_tokens(tmp_path):
    trainer = _stage2(tmp_path, "optim.weight_decay=0.0")
    recipe = trainer.recipe
    h, w, D = recipe.grid
    assert (h, w, D) == (4, 4, 2)  # 32 px, 3 levels (8x down), 2 codes per position
    assert not any(n.startswith(("vq/", "codebook", "token_ids")) for n in trainer.opt.trainable)
    from mmjax.data import shapes

    t2i = recipe.preprocess("t2i")(shapes.ShapesSource("train", "caption")[0])
    dec = recipe.preprocess("decompress")(shapes.ShapesSource("train", "image")[0])
    for row, images in ((t2i, 0), (dec, h * w)):
        slot, train = row["slot"], row["train"]
        assert (slot == 1).sum() == images and (slot == 2).sum() == h * w * D
        np.testing.assert_array_equal(train, slot == 2)  # the code tokens are the targets, all of them
        assert row["ids"][np.argmax(slot == 2) - 1] == recipe.rows.boi  # <image> opens the code map
    state = trainer.init_state()
    batch = _batches(trainer, 1)[0]
    params = jax.device_get(state.params)
    params["token_ids"] = np.asarray(
        unicode.code_token_ids(params["llm"]["embedder"]["embedding"], 32, recipe.specials)
    )
    _, ids = jax.jit(recipe.sequence)(params, batch)
    _, codes, _, _ = recipe.tokenize(params, batch["images"])
    for b in range(len(ids)):  # each row's code slots: its own image's codes as token ids, in order
        code_slots = np.asarray(ids[b])[batch["slot"][b] == 2]
        if len(code_slots):
            np.testing.assert_array_equal(code_slots, params["token_ids"][np.asarray(codes[b]).reshape(-1)])
    before = tree.flat(params)
    step, s = jax.jit(trainer.train_step), state.replace(params=jax.device_put(params))
    for b in _batches(trainer, 3):
        s, metrics = step(s, {}, b)
    after = tree.flat(jax.device_get(s.params))
    for n in before:  # the tokenizer, its codebook and the code map are frozen; the LLM trains
        same = np.array_equal(np.asarray(before[n]), np.asarray(after[n]))
        assert same == n.startswith(("vq/", "codebook", "token_ids")), n
    assert {f"loss/{c}" for c in ("caption", "vqa", "t2i", "decompress")} <= set(metrics)
    # a code sequence the LLM writes decodes to an image shapes-eval scores
    prompts = [{"text": "a red circle"}, {"text": "two blue squares"}]
    after_params = jax.device_get(s.params)
    out = recipe.sample(after_params, prompts, 2, trainer.context(s, "t"))
    images = np.stack([o["image"] for row in out for o in row])
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8
    source = shapes_eval.PromptSource(1, 4)
    records = [source[i] for i in range(24)]
    score = shapes_eval.GenEval({"prompts_per_task": 1, "samples_per_prompt": 4})(
        {"image": np.concatenate([images] * 6), "index": np.array([r["index"] for r in records])}
    )
    assert 0.0 <= score["overall"] <= 1.0 and len(score) > 6
    # render(codes) decodes what the tokenizer's aggregate decodes (the generation's last step;
    # z + sg(q - z) is q up to float rounding: a grey level at most)
    agg, codes, _, _ = recipe.tokenize(after_params, batch["images"][:2])
    rendered = np.asarray(recipe.render(after_params, codes), np.int32)
    np.testing.assert_allclose(rendered, unicode_recipe.to_uint8(recipe.decode(after_params, agg)), atol=1)


def test_mmjax_train_logs_the_same_losses_on_8_devices_as_on_1(tmp_path):
    args = ["--config", f"{CONFIG}:tiny_stage1", *(f"--config.{o}" for o in SMALL)]
    args += ["--config.train.log_every=1", "--config.evals={}", "--config.train.save_every=4"]
    logs = {}
    for n in (1, 8):
        run_mmjax("train", *args, "--workdir", str(tmp_path / str(n)), f"--config.mesh.data={n}", devices=n)
        rows = [json.loads(line) for line in (tmp_path / str(n) / "metrics.jsonl").read_text().splitlines()]
        logs[n] = [(r["step"], r["loss"], r["psnr"], r["usage"]) for r in rows if "loss" in r]
    assert len(logs[1]) == 4
    for a, b in zip(logs[1], logs[8], strict=True):
        assert a[0] == b[0] and a[3] == b[3]
        np.testing.assert_allclose(a[1:3], b[1:3], rtol=2e-4)
