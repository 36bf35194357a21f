"""MM1 recipe: packed documents stay apart, mixing shares, the LR law in the trainer, image
splicing, few-shot prompts, resolution variants, and pre-training -> SFT -> VQA above chance."""

import collections
import itertools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmjax import cli, config as config_lib, recipes
from mmjax.data import pipeline
from mmjax.models.vlm import splice
from mmjax.recipes.base import Context
from mmjax.train import optim, trainer as trainer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MM1 = os.path.join(ROOT, "configs", "mm1.py")
SMALL_DATA = [f"data.components.{n}.num_records=256" for n in ("caption", "interleaved", "text")]


def load(variant="tiny", *overrides):
    return config_lib.load(f"{MM1}:{variant}", list(overrides))


@pytest.fixture(scope="module")
def tiny():
    cfg = load("tiny", "train.steps=8", *SMALL_DATA)
    recipe = recipes.get(cfg)
    params = nn.unbox(recipe.init(jax.random.key(0)))["params"]
    return cfg, recipe, params


def test_splice_puts_the_nth_visual_token_at_the_nth_placeholder():
    text = jnp.zeros((2, 6, 3))
    visual = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3) + 1
    is_image = jnp.array([[0, 1, 1, 0, 1, 1], [1, 0, 0, 0, 0, 0]], bool)
    out = splice(text, visual, is_image)
    np.testing.assert_array_equal(out[0, [1, 2, 4, 5]], visual[0])
    np.testing.assert_array_equal(out[1, 0], visual[1, 0])
    assert float(jnp.abs(out[0, [0, 3]]).sum()) == 0 and float(jnp.abs(out[1, 1:]).sum()) == 0


def test_packed_documents_do_not_see_each_other(tiny):
    """A packed row's second document gives the same logits as alone, whatever the first holds."""
    cfg, recipe, params = tiny
    pre = recipe.preprocess("caption")
    from mmjax.data import shapes

    src = shapes.ShapesSource("train", "caption", num_records=8)
    a, b, c = (pre(src[i]) for i in range(3))

    def row(*docs, packed=True):
        tokens = np.concatenate([d["tokens"] for d in docs])
        seg = np.concatenate([np.full(len(d["tokens"]), i + 1 if packed else 1) for i, d in enumerate(docs)])
        pos = np.concatenate([np.arange(len(d["tokens"])) for d in docs])
        images = np.concatenate([d["images"] for d in docs])
        logits, _ = recipe.model.apply(
            {"params": params},
            jnp.asarray(tokens)[None],
            jnp.asarray(images, jnp.float32)[None] / 127.5 - 1,
            positions=jnp.asarray(pos)[None],
            segment_ids=jnp.asarray(seg)[None],
        )
        return np.asarray(logits[0])

    alone = row(b)
    n = len(b["tokens"])
    np.testing.assert_allclose(row(a, b)[-n:], alone, atol=1e-5)
    np.testing.assert_allclose(row(c, b)[-n:], alone, atol=1e-5)
    assert not np.allclose(row(a, b, packed=False)[-n:], alone, atol=1e-3)  # without segments it would leak


def test_packed_rows_keep_documents_whole_mixing_shares_and_any_worker_count(tiny):
    cfg, recipe, _ = tiny
    cfg = load("tiny", "train.steps=20", *SMALL_DATA)
    ds = pipeline.train_dataset(cfg, recipe.preprocess, recipe.packing())
    docs = collections.Counter()
    image_id = recipe.fmt.image_id
    # the train.steps batches a run draws (the packed stream itself runs on for ~2700 batches)
    for batch in itertools.islice(ds, cfg.train.steps):
        for r in range(batch["tokens"].shape[0]):
            seg, comp = batch["tokens_segment_ids"][r], batch["component"][r]
            tokens, img_seg = batch["tokens"][r], batch["images_segment_ids"][r]
            for s in range(1, seg.max() + 1):
                here = seg == s
                assert len(set(comp[here])) == 1  # one document, one component
                assert tokens[here][0] == recipe.tokenizer.bos_token_id  # starts at its BOS: not split
                np.testing.assert_array_equal(batch["tokens_positions"][r][here], np.arange(here.sum()))
                # its placeholders match its images
                assert (tokens[here] == image_id).sum() == 16 * (img_seg == s).sum()
                docs[recipe.names[comp[here][0]]] += 1
    total = sum(docs.values())
    assert total > 500
    for name, weight in (("caption", 0.45), ("interleaved", 0.45), ("text", 0.10)):
        assert abs(docs[name] / total - weight) < 0.04, docs
    # packing happens after the worker processes: the packed rows are the same with 2 workers
    workers = pipeline.train_dataset(cfg, recipe.preprocess, recipe.packing(), num_workers=2)
    for want in itertools.islice(pipeline.train_dataset(cfg, recipe.preprocess, recipe.packing()), 3):
        got = next(workers)
        assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)


def test_loss_counts_text_tokens_only(tiny):
    cfg, recipe, params = tiny
    rec = recipe.preprocess("caption")
    from mmjax.data import shapes

    ex = rec(shapes.ShapesSource("train", "caption", num_records=4)[1])
    assert not ex["loss_mask"][ex["targets"] == recipe.fmt.image_id].any()
    assert ex["loss_mask"][-1] == 1 and ex["targets"][-1] == recipe.tokenizer.eos_token_id
    qa = recipe.preprocess("caption").__class__(recipe.fmt, "qa", 0, 128, 4)
    ex = qa(shapes.ShapesSource("train", "qa", num_records=4)[1])
    answer = recipe.tokenizer.decode(ex["targets"][ex["loss_mask"] > 0], skip_special_tokens=True)
    assert answer.strip() == shapes.ShapesSource("train", "qa", num_records=4)[1]["answer"]


def test_few_shot_prompts(tiny):
    cfg, recipe, _ = tiny
    evs = recipe.evaluators()
    assert set(evs) == {f"{t}_{k}shot" for t in ("caption", "vqa") for k in (0, 4, 8)}
    from mmjax.data import shapes

    for name, k in (("caption_4shot", 4), ("vqa_8shot", 8), ("vqa_0shot", 0)):
        ev = evs[name]
        rec = shapes.ShapesSource("val", ev.data.view, num_records=4)[2]
        ex = ev.preprocess(rec)
        ids = ex["tokens"][ex["mask"]]
        assert ex["images"].shape[0] == k + 1
        assert (ids == recipe.fmt.image_id).sum() == 16 * (k + 1)
        text = recipe.tokenizer.decode(ids, skip_special_tokens=True)
        if name.startswith("vqa"):
            assert text.count("Answer:") == k + 1 and text.rstrip().endswith(f"{rec['question']} Answer:")
        else:
            assert ids[-1] == recipe.fmt.image_id
        np.testing.assert_array_equal(ex["images"][-1], rec["image"])


def test_lr_law_drives_the_schedule():
    cfg = load("tiny", "train.steps=400", *SMALL_DATA)
    t = trainer_lib.Trainer(cfg, "")
    eta, wd = optim.mm1_lr_law(t.num_params)
    sched = t.opt.schedule
    assert abs(float(sched(cfg.optim.warmup_steps)) - eta) < 1e-9
    assert abs(float(sched(cfg.train.steps)) - 0.1 * eta) < 1e-9  # cosine to 10% of the peak
    assert np.isclose(eta, np.exp(-0.4214 * np.log(t.num_params) - 0.5535)) and wd == 0.1


@pytest.mark.parametrize("variant", ["tiny_sft_hires", "tiny_sft_subimages"])
def test_higher_resolution_variants_keep_the_parameter_shapes(tiny, variant):
    _, base, base_params = tiny
    cfg = load(variant, "data.components.qa.num_records=16", "init.mm1.path=" + ROOT)
    recipe = recipes.get(cfg)
    params = nn.unbox(recipe.init(jax.random.key(0)))["params"]
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, base_params)  # loads the 32 px weights
    from mmjax.data import shapes

    ex = recipe.preprocess("qa")(shapes.ShapesSource("train", "qa", image_size=64, num_records=2)[0])
    per = 5 if variant.endswith("subimages") else 1
    side = 32 if per == 5 else 64
    assert ex["images"].shape == (per, side, side, 3)
    assert (ex["tokens"] == recipe.fmt.image_id).sum() == 16 * per
    logits, _ = recipe.model.apply(
        {"params": params},
        jnp.asarray(ex["tokens"])[None],
        jnp.asarray(ex["images"], jnp.float32)[None] / 127.5 - 1,
    )
    assert logits.shape == (1, len(ex["tokens"]), recipe.model.llm.vocab_size)


@pytest.mark.long(2)
def test_pipeline_pretrain_then_sft_from_its_export(tmp_path):
    """configs/mm1.py:tiny_pipeline: tiny pre-training lowers every component's loss and its export
    loads as trained weights; the SFT stage starts from that export and evaluates."""
    from mmjax import weights
    from mmjax.recipes import mm1
    from mmjax.train import stages

    data = [f"pretrain.{o}" for o in SMALL_DATA]
    cfg = load(
        "tiny_pipeline",
        "pretrain.train.steps=90",
        "pretrain.train.save_every=90",
        "pretrain.train.log_every=15",  # 90 steps: each loss ends near 0.3 of its first row
        "pretrain.evals={}",
        *data,
        # a short SFT and one evaluator batch: the last stage runs from the export and evaluates
        "sft.train.steps=10",
        "sft.evals.vqa_0shot.num_examples=32",
    )
    results = stages.train(cfg, str(tmp_path))
    rows = [r for r in _metrics(tmp_path / "pretrain") if "loss" in r]
    for name in ("caption", "interleaved", "text"):
        assert rows[-1][f"loss/{name}"] < 0.5 * rows[0][f"loss/{name}"], rows

    model, params, tok = weights.load_vlm(str(tmp_path / "pretrain" / "export"))  # as IOMM loads its MLLM
    pt = stages.stage_config(cfg, "pretrain", str(tmp_path))
    recipe = recipes.get(pt)
    batch = pipeline.first_batch(pipeline.train_dataset(pt, recipe.preprocess, recipe.packing()))
    apply = jax.jit(
        lambda p, b: model.apply(
            {"params": p},
            b["tokens"],
            mm1.to_float(b["images"]),
            positions=b["tokens_positions"],
            segment_ids=b["tokens_segment_ids"],
        )
    )
    logits, _ = apply(params, batch)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    mask = batch["loss_mask"] * (batch["tokens_segment_ids"] > 0)
    assert float((ce * mask).sum() / mask.sum()) < 0.5 * np.log(len(tok))  # the trained weights, not fresh

    final = results["sft"]
    print({k: round(v, 3) for k, v in final.items() if k.startswith("vqa")})
    assert "vqa_0shot/accuracy" in final and "vqa_0shot/prior" in final, final


def test_sampler_answers_as_the_evaluator_generates(tiny):
    """What `mmjax sample` calls: for an image and a question, the greedy answer is what the VQA
    evaluator generates from its 0-shot prompt; with several samples, one answer each."""
    from mmjax.data import shapes

    cfg, recipe, params = tiny
    val = shapes.ShapesSource("val", "qa", num_records=4)
    prompts = [{"text": val[i]["question"], "image": val[i]["image"]} for i in range(4)]
    ctx = Context(rng=jax.random.key(0), step=jnp.int32(0), state={})
    assert [len(o) for o in recipe.sample(params, prompts[:2], 3, ctx)] == [3, 3]  # sampled at temperature 1
    answers = [o[0]["text"] for o in recipe.sample(params, prompts, 1, ctx)]  # greedy
    ev = recipe.evaluators()["vqa_0shot"]
    rows = [ev.preprocess(val[i]) for i in range(4)]
    batch = {k: np.stack([r[k] for r in rows]) for k in ("tokens", "mask", "images")}
    ids = recipe.generate(params, batch["tokens"], batch["mask"], batch["images"], 24)
    assert answers == [
        t.strip() for t in recipe.tokenizer.batch_decode(np.asarray(ids), skip_special_tokens=True)
    ]
    with pytest.raises(config_lib.ConfigError, match="give --image"):
        recipe.sample(params, [{"text": "what colour is the circle?"}], 1, ctx)


def _metrics(workdir):
    import json

    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_attention_mask_of_packed_rows(tiny):
    """The mask the LLM builds from a packed batch: causal, and never across documents."""
    cfg, recipe, _ = tiny
    from mmjax.models.llm import make_mask

    ds = pipeline.train_dataset(cfg, recipe.preprocess, recipe.packing())
    batch = pipeline.first_batch(ds)
    seg = batch["tokens_segment_ids"]
    mask = np.asarray(make_mask(jnp.arange(seg.shape[1]), jnp.ones(seg.shape, bool), jnp.asarray(seg)))
    q, k = np.meshgrid(np.arange(seg.shape[1]), np.arange(seg.shape[1]), indexing="ij")
    for r in range(seg.shape[0]):
        same = seg[r][:, None] == seg[r][None, :]
        np.testing.assert_array_equal(mask[r], same & (k <= q))
    assert (seg.max(1) >= 2).any()  # some rows really hold several documents


@pytest.mark.parametrize("variant", ["1b", "3b", "3b_moe"])
def test_full_scale_configs_build_abstractly(variant):
    """ViT-L/14 at 336 px + a 1-3B LLM, MM1's batch: parameter counts from abstract shapes."""
    cfg = load(variant)
    t = trainer_lib.Trainer(cfg, "")  # validates, abstract init, optimizer: nothing allocated
    vision = sum(a.size for n, a in _flat(t.abstract_params).items() if n.startswith("vision/"))
    assert 300e6 < vision < 320e6  # ViT-L/14
    llm = t.num_params - vision
    assert {"1b": 0.9e9 < llm < 1.2e9, "3b": 2.4e9 < llm < 3.0e9, "3b_moe": llm > 10e9}[variant], llm
    assert dict(t.mesh.shape)["fsdp"] == 8 and cfg.data.global_batch_size == 512 and cfg.model.seq_len == 4096


@pytest.mark.long
def test_full_scale_moe_step_compiles_on_fake_devices():
    info = cli.check(load("3b_moe"))
    assert info["params"] > 10e9 and info["argument_bytes"] > 0 and info["mesh"]["fsdp"] == 8


def _flat(params):
    from mmjax import tree

    return tree.flat(params)


def test_synthetic_captions_are_complete_and_true(tiny):
    _, recipe, _ = tiny
    from mmjax.data import shapes
    from mmjax.eval import shapes_eval
    from mmjax.recipes import mm1

    src = shapes.ShapesSource("train", "caption", num_records=20)
    pre = mm1.Preprocess(recipe.fmt, "synthetic", 0, 128, 4)
    for i in range(20):
        rec = src[i]
        text = mm1.dense_caption(rec)
        assert shapes_eval.caption_correct(text, shapes.scene("train", i), complete=True), text
        ex = pre(rec)
        learned = recipe.tokenizer.decode(ex["targets"][ex["loss_mask"] > 0], skip_special_tokens=True)
        assert learned.strip() == text


@pytest.mark.parametrize("source", ["folder", "wds", "records", "tfds"])
def test_trains_on_each_real_captioned_source(source, tmp_path):
    """MM1 captioning from one real source at a time (the IOMM stage-1 test trains on all four
    mixed): its corrupt image skipped and counted, the captions reach the loss."""
    import json

    from test_sources import four_sources

    comp = four_sources(tmp_path)[source]
    cfg = load(
        "tiny",
        "evals={}",
        "train.steps=2",
        "train.log_every=1",
        "data.global_batch_size=8",
        "data.max_skip_rate=0.5",
    )
    with cfg.unlocked():
        cfg.data.components = {source: config_lib.component(**comp, format="caption", view="caption")}
    recipe, src = recipes.get(cfg), pipeline.make_source(cfg.data.components[source], 32)
    record = next(r for r in (src[i] for i in range(len(src))) if "_skip" not in r)
    example = recipe.preprocess(source)(record)
    text = recipe.tokenizer.decode(example["targets"][example["loss_mask"] > 0], skip_special_tokens=True)
    assert text.strip() == record["text"] and text.startswith(("a red", "colour")), text
    workdir = str(tmp_path / "run")
    trainer_lib.train(cfg, workdir)
    rows = [json.loads(line) for line in open(f"{workdir}/metrics.jsonl") if '"loss"' in line]
    assert [r["step"] for r in rows] == [1, 2] and np.isfinite(rows[-1][f"loss/{source}"])
    assert rows[-1]["data/skipped"] > 0 and 0 < rows[-1]["data/skip_rate"] < 0.5


def test_long_texts_are_cut_or_skipped_and_counted_never_raised(tiny, monkeypatch):
    cfg, recipe, _ = tiny
    from mmjax.recipes import mm1

    rec = {
        "index": np.int64(3),
        "image": np.zeros((32, 32, 3), np.uint8),
        "text": " ".join(["a red circle"] * 60),
    }
    assert len(recipe.tokenizer.encode(rec["text"])) > 128
    skipped = mm1.Preprocess(recipe.fmt, "caption", 0, 128, 4)(rec)
    assert skipped == {"index": 3, "_skip": "more tokens than model.seq_len"}
    cut = mm1.Preprocess(recipe.fmt, "caption", 0, 128, 4, max_text_tokens=20)(rec)
    assert "_skip" not in cut and cut["loss_mask"].sum() == 20 + 1  # the first 20 caption tokens and EOS
    assert (
        mm1.Preprocess(recipe.fmt, "interleaved", 0, 128, 1)(
            {"index": 1, "images": np.zeros((2, 32, 32, 3), np.uint8), "texts": ["a", "b"]}
        )["_skip"]
        == "more images than model.image_slots"
    )

    # through the stream: every 5th caption is too long; the rows go on and the stream counts them
    class Long:
        def __init__(self, comp, image_size):
            self.src = pipeline.make_source(config_lib.component(view="caption", num_records=64), image_size)

        def __len__(self):
            return len(self.src)

        def __getitem__(self, i):
            r = self.src[i]
            return {**r, "text": rec["text"]} if i % 5 == 0 else r

    monkeypatch.setitem(pipeline.SOURCES, "long", Long)
    c = load("tiny", "data.global_batch_size=8", "data.max_skip_rate=0.5")
    with c.unlocked():
        c.data.components = {"caption": config_lib.component(source="long", view="caption", format="caption")}
    stream = pipeline.train_dataset(c, recipes.get(c).preprocess, recipes.get(c).packing())
    for _ in range(3):
        assert next(stream)["tokens"].shape == (8, 128)
    assert stream.shards[0].state["skipped"]["more tokens than model.seq_len"] > 0
