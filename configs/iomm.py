"""IOMM: image-only pre-training of a flow-matching MM-DiT conditioned by a frozen MLLM, then
mixed fine-tuning with a few text-image pairs; GenEval-style and editing evaluation.

  mmjax train  --config configs/iomm.py:tiny --workdir workdirs/iomm     # the whole chain (CPU)
  mmjax sample --config configs/iomm.py:tiny --workdir workdirs/iomm \
      --prompt "a red circle to the left of a blue square" --out samples

`tiny` is a pipeline: `mllm` (MM1 tiny pre-training, exported as the frozen MLLM), `stage1`
(image-only: no text anywhere), `stage2` (a share `lambda` of image-only samples, the rest from
`pairs` text-image pairs), each stage a key of the config (`--config.stage1.train.steps=500`). With
an MLLM of your own, set `--config.stage1.frozen.mllm.path=EXPORT --config.stage2.frozen.mllm.path=EXPORT`
and the `mllm` stage is skipped. Single stages: `tiny_stage1`, `tiny_stage2`; cluster scale: `b`.
"""

import os

from mmjax import config as C

VARIANTS = ("tiny", "tiny_stage1", "tiny_stage2", "b_stage1", "b_stage2", "b")
# the fixed prompt c_aux; the shapes tokenizer's words (an HF MLLM: "Generate an image identical to
# the reference image:")
PROMPT = "a picture of the image"


def _mllm(variant: str):
    """The MM1 config of the frozen MLLM (configs/mm1.py)."""
    return C.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "mm1.py") + ":" + variant)


def _evals(c, prompts_per_task=8, edits=48, batch_size=48):
    c.evals.geneval = C.geneval(prompts_per_task, 4, batch_size)
    c.evals.edit = C.component(
        split="test", view="edit", task="edit", num_examples=edits, batch_size=batch_size
    )
    c.evals.reconstruct = C.component(
        split="test", view="image", task="reconstruct", num_examples=edits, batch_size=batch_size
    )
    for name, view in (("loss_image", "image"), ("loss_t2i", "caption")):  # the held-out flow losses
        c.evals[name] = C.component(split="val", view=view, task="loss", num_examples=256, batch_size=64)


def _stage(mllm, stage: int, pairs: int, lam: float):
    c = C.base()
    c.recipe = "iomm"
    c.model = dict(
        mllm=mllm.model.to_dict(),  # the MLLM's architecture (its export's, once there is one)
        cond_len=32,
        prompt=PROMPT,
        adapter=dict(
            adapter="rqa", num_queries=16, num_heads=4, mlp_ratio=2.0, connector_depth=2, pooled=True
        ),
        mllm_image_size=0,  # the size the MLLM reads references at (0: data.image_size)
        mllm_layer=-1,  # the LLM's hidden states the generator reads: -1 the last (normed), k layer k's
        vae=dict(),  # the autoencoder's architecture when frozen.vae has no folder yet (b: FLUX's)
        mim=dict(ratio=0.45, per_element=False),
        generator=dict(
            width=96,
            num_heads=4,
            depth_double=2,
            depth_single=2,
            mlp_ratio=2.0,
            patch_size=4,
            positions="rope",
            scan=True,  # faster on CPU too (BENCHMARKS.md section 8)
            remat="",
        ),
        flow=dict(time="logit_normal", time_mean=0.0, time_std=1.0, shift=1.0, cond_dropout=0.1),
        sample=dict(steps=20, shift=1.0, cfg=3.0, batch_size=16),  # batch_size: `mmjax sample`'s
        dtype="float32",
    )
    c.frozen.mllm = dict(path="", into="mllm", dtype="float32")
    c.data.image_size = mllm.data.image_size
    c.data.components.images = C.component(
        view="image", format="image", weight=lam if stage == 2 else 1.0, num_records=4096, cache=True
    )
    if stage == 2:
        c.data.components.pairs = C.component(
            view="caption", format="caption", weight=1.0 - lam, num_records=pairs, cache=True
        )
        c.init.iomm = dict(path="", into="", skip="")
    c.data.global_batch_size = 16
    c.optim.update(
        name="adamw", lr=2e-3, b1=0.9, b2=0.95, weight_decay=0.0, clip_norm=1.0, warmup_steps=50, lr_floor=0.1
    )
    # EMA 0.99 for the short CPU runs (IOMM's 0.999 in `b`)
    c.train.update(steps=1000, log_every=50, save_every=250, ema_decay=0.99)
    _evals(c)
    if stage == 1:  # text-to-image and edits need stage 2's pairs; stage 1 draws its references back
        c.evals = dict(reconstruct=c.evals.reconstruct, loss_image=c.evals.loss_image)
    return c


def get_config(arg=None):
    variant = arg or VARIANTS[0]
    if variant == "tiny":
        mllm = _mllm("tiny")
        mllm.evals = {}
        mllm.train.steps = 300
        s1, s2 = _stage(mllm, 1, 512, 0.5), _stage(mllm, 2, 512, 0.5)
        return C.pipeline(
            ("mllm", mllm, {}),
            ("stage1", s1, {"frozen.mllm": "mllm"}),
            ("stage2", s2, {"frozen.mllm": "mllm", "init.iomm": "stage1"}),
        )
    if variant.startswith("tiny_stage"):
        return _stage(_mllm("tiny"), int(variant[-1]), 512, 0.5)
    if variant == "b":
        return C.pipeline(("stage1", _b(1), {}), ("stage2", _b(2), {"init.iomm": "stage1"}))
    return _b(int(variant[-1]))


# A Qwen2.5-1.5B-shaped LLM behind MM1's ViT-L/14 and C-Abstractor: a 2B-class MLLM.
LLM_1_5B = dict(
    width=1536,
    depth=28,
    num_heads=12,
    num_kv_heads=2,
    mlp_dim=8960,
    vocab_size=0,
    tie_embeddings=True,
    qkv_bias=True,
    rope_theta=1e6,
)
# FLUX.1's autoencoder (16 latent channels, 8x down); point frozen.vae.path at its converted folder.
FLUX_VAE = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=16,
    norm_num_groups=32,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=True,
)


def _b(stage: int):
    """IOMM-B: an MM-DiT of about 1.6B parameters on 512 px latents of FLUX's autoencoder, a 2B-class
    MLLM (frozen: --config.frozen.mllm.path=EXPORT, --config.frozen.vae.path=VAE), batch 1024."""
    mllm = _mllm("1b")
    with mllm.unlocked():
        mllm.model.llm = dict(**LLM_1_5B, moe=mllm.model.llm.moe.to_dict())
    c = _stage(mllm, stage, 200_000, 0.5)
    c.model.update(
        cond_len=192,
        prompt="Generate an image identical to the reference image:",
        mllm_image_size=336,
        dtype="bfloat16",
    )
    c.model.adapter.update(num_queries=256, num_heads=16, mlp_ratio=2.0)
    c.model.generator.update(
        width=1536,
        num_heads=12,
        depth_double=8,
        depth_single=24,
        mlp_ratio=4.0,
        patch_size=2,
        scan=True,
        remat="nothing_saveable",
    )
    c.model.vae = FLUX_VAE
    c.model.flow.update(shift=3.0)
    c.model.sample.update(steps=30, shift=3.0, cfg=4.5)
    c.frozen.mllm.dtype = "bfloat16"
    c.frozen.vae = dict(path="", into="vae", dtype="bfloat16")
    c.data.image_size = 512
    for comp in c.data.components.values():
        comp.update(num_records=0, cache=False)
    # FSDP over every chip of a slice or node; mesh_dcn.data spans slices or nodes
    c.mesh.update(data=1, fsdp=-1)
    c.data.update(global_batch_size=1024, num_workers=8)
    c.optim.update(lr=1e-4, warmup_steps=1000, lr_floor=0.1)
    c.train.update(steps=200_000, log_every=100, save_every=2000, keep_period=20_000, ema_decay=0.999)
    _evals(c, prompts_per_task=92, edits=528, batch_size=48)  # ~553 GenEval-sized prompts x 4
    if stage == 1:
        c.evals = dict(reconstruct=c.evals.reconstruct, loss_image=c.evals.loss_image)
    return c
