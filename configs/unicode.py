"""UniCode: a VQ tokenizer whose codes are LLM token ids (stage 1), then the LLM trained over unified
sequences of words and codes (stage 2: captioning, VQA, text-to-image, in-context decompression).

  mmjax train  --config configs/unicode.py:tiny --workdir workdirs/unicode   # both stages (CPU)
  mmjax eval   --config configs/unicode.py:tiny --workdir workdirs/unicode   # VQA, GenEval, PSNR
  mmjax sample --config configs/unicode.py:tiny --workdir workdirs/unicode \
      --prompt "a red circle" --out samples

`tiny` is a pipeline: `stage1` (the tokenizer; language-driven EMA codebook by default,
`--config.stage1.model.codebook.mode=frozen` or `=dual` for the other two) then `stage2` (the tokenizer
frozen, the LLM trained; it starts from stage 1's export). Single stages: `tiny_stage1`,
`tiny_stage2`. Full scale `7b` (and `7b_stage1`, `7b_stage2`): 256 px, a LLaMA-2-7B table
(32,000 x 4,096), 16,384 codes, a 16x16x4 code map; start it from a converted LLM with
`--config.stage1.init.llm.path=...` (`mmjax convert hf-import`) and its tokenizer
(`--config.stage1.model.tokenizer=... --config.stage2.model.tokenizer=...`).
"""

from mmjax import config as C

VARIANTS = ("tiny", "tiny_stage1", "tiny_stage2", "7b", "7b_stage1", "7b_stage2")


def _codebook(**kw):
    return dict(
        mode="language", decay=0.99, eps=1e-5, beta=0.25, ramp=(0.1, 0.8), dead_threshold=1.0, chunk=0, **kw
    )


def _model(scale: str, stage: int):
    if scale == "tiny":
        model = dict(
            vq=dict(
                depth=2,
                aggregate="concat",
                block_out_channels=(32, 64, 64),
                layers_per_block=1,
                latent_channels=32,
                norm_num_groups=8,
            ),
            llm=dict(vocab_size=512, width=128, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=256),
            num_codes=256,
            seq_len=32 if stage == 1 else 200,  # stage 1: the dual mode's captions; 2: 1 + 64 + 1 + 128 codes
            loss_chunk=0,  # > 0: the LM head + cross-entropy this many positions at a time
            dtype="float32",
        )
    else:
        model = dict(
            vq=dict(
                depth=4,
                aggregate="concat",
                block_out_channels=(128, 128, 256, 256, 512),
                layers_per_block=2,
                latent_channels=256,
                norm_num_groups=32,
            ),
            llm=dict(
                vocab_size=32000,
                width=4096,
                depth=32,
                num_heads=32,
                mlp_dim=11008,
                scan=True,
                remat="nothing_saveable",
                attention="auto",  # cuDNN / splash kernels on GPU / TPU (models/layers.attention_impl)
            ),  # LLaMA-2-7B
            loss_chunk=256,  # the LM head + cross-entropy 256 positions at a time (no [B, T, V] logits)
            num_codes=16384,
            seq_len=128 if stage == 1 else 1408,  # 1 + 256 + 1 + 1024 codes, and room for the prompt
            dtype="bfloat16",
        )
    # sample: t2i code sampling; prompt_tokens: the text part of an evaluation or sampling prompt
    sample = dict(temperature=1.0, top_k=0, max_text_tokens=24, prompt_tokens=48)
    return dict(stage=stage, tokenizer="", codebook=_codebook(), sample=sample, **model)


def _stage(scale: str, stage: int):
    tiny = scale == "tiny"
    c = C.base()
    c.recipe = "unicode"
    c.model = _model(scale, stage)
    S = 32 if tiny else 256
    records = dict(num_records=2048, cache=True) if tiny else {}
    c.data.update(image_size=S, global_batch_size=32 if tiny else 256)
    if not tiny:
        c.data.num_workers = 8
    evals = dict(num_examples=64, batch_size=32) if tiny else dict(num_examples=1024, batch_size=64)
    c.evals.reconstruct = C.component(split="val", view="image", task="reconstruct", **evals)
    if stage == 1:
        # caption records: images for the tokenizer, captions for the dual mode's LLM steps
        c.data.components = dict(images=C.component(view="caption", format="caption", **records))
        c.init.llm = dict(path="", into="llm", skip="")
        c.optim.update(dict(lr=2e-3, warmup_steps=20) if tiny else dict(lr=1e-4, warmup_steps=2000))
    else:
        c.data.components = dict(
            caption=C.component(view="caption", format="caption", weight=0.3, **records),
            vqa=C.component(view="qa", format="vqa", weight=0.3, **records),
            t2i=C.component(view="caption", format="t2i", weight=0.3, **records),
            decompress=C.component(view="image", format="decompress", weight=0.1, **records),
        )
        c.init.unicode = dict(path="", into="", skip="")
        c.optim.update(dict(lr=1e-3, warmup_steps=20) if tiny else dict(lr=2e-5, warmup_steps=500))
        c.evals.vqa = C.component(split="val", view="qa", task="vqa", max_new_tokens=6, **evals)
        c.evals.geneval = C.geneval(4 if tiny else 64, 4, 48 if tiny else 64)
    if tiny:
        c.train.update(steps=300 if stage == 1 else 400, log_every=20, save_every=400)
    else:
        # FSDP over every chip of a slice or node; mesh_dcn.data spans slices or nodes
        c.mesh.update(data=1, fsdp=-1)
        c.train.update(steps=200_000 if stage == 1 else 50_000, log_every=100, save_every=5000)
    return c


def get_config(arg=None):
    variant = arg or "tiny"
    if variant not in VARIANTS:
        raise C.ConfigError(f"unknown variant {variant!r}; variants: {', '.join(VARIANTS)}")
    scale, _, stage = variant.partition("_")
    if stage:
        return _stage(scale, int(stage[-1]))
    return C.pipeline(
        ("stage1", _stage(scale, 1), {}), ("stage2", _stage(scale, 2), {"init.unicode": "stage1"})
    )
