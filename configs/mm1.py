"""MM1: ViT -> connector -> LLM pre-training on captions / interleaved documents / text
(45:45:10), then SFT (question -> answer); 0/4/8-shot captioning and VQA.

  mmjax train  --config configs/mm1.py:tiny --workdir workdirs/mm1          # pre-train (CPU minutes)
  mmjax export --config configs/mm1.py:tiny --workdir workdirs/mm1          # -> workdirs/mm1/export
  mmjax train  --config configs/mm1.py:tiny_sft --workdir workdirs/mm1_sft \
      --config.init.mm1.path=workdirs/mm1/export
  mmjax eval   --config configs/mm1.py:tiny_sft --workdir workdirs/mm1_sft

Variants: tiny (pre-training), tiny_sft, tiny_sft_hires (64 px by position-embedding
interpolation), tiny_sft_subimages (64 px as 2x2 crops + overview), and the full-scale
`3b` / `1b` (ViT-L/14 at 336 px + a Qwen2.5-3B- / TinyLlama-1.1B-shaped LLM, MM1's batch of 512
sequences of 4096 tokens with up to 16 images of 144 tokens); `3b_moe` adds top-2 MoE FFNs.
"""

from mmjax import config as C
from mmjax.models import llm, vit


def _evals(c, tasks=("caption", "vqa"), shots=(0, 4, 8), n=64):
    for task in tasks:
        for k in shots:
            view = "caption" if task == "caption" else "qa"
            c.evals[f"{task}_{k}shot"] = C.component(
                split="val", view=view, num_examples=n, batch_size=32, task=task, shots=k, max_new_tokens=24
            )


def _moe(num_experts=0):
    return dict(
        num_experts=num_experts,
        top_k=2,
        every=1,
        capacity_factor=1.25,
        load_balance_weight=0.01,
        z_loss_weight=0.001,
    )


def _tiny(c):
    c.data.image_size = 32
    for name, view, fmt, weight in (
        ("caption", "caption", "caption", 45.0),
        ("interleaved", "interleaved", "interleaved", 45.0),
        ("text", "text", "text", 10.0),
    ):
        c.data.components[name] = C.component(
            view=view, format=fmt, weight=weight, num_records=2048, cache=True, max_text_tokens=0
        )
    c.model = dict(
        # pixels: the statistics the tower expects (signed | clip | imagenet; an imported tower states its own)
        vision=dict(
            patch_size=4, width=64, depth=2, num_heads=4, mlp_dim=128, posemb_size=0, pixels="signed"
        ),
        # MM1: connector type barely matters (RESULTS.md); average pooling is the cheapest on a CPU
        connector=dict(kind="avg_pool", num_tokens=16),
        llm=dict(
            width=128,
            depth=2,
            num_heads=4,
            num_kv_heads=2,
            mlp_dim=256,
            tie_embeddings=True,
            vocab_size=0,
            moe=_moe(),
        ),
        seq_len=128,
        image_slots=4,
        loss_chunk=0,  # > 0: the LM head + cross-entropy this many positions at a time
        max_images=0,  # > 0: encode at most this many (non-empty) image slots per batch
        subimages=False,
        tokenizer="",  # '' = the shapes tokenizer shipped with mmjax
        dtype="float32",
        scan=False,
        remat="",
    )
    c.data.global_batch_size = 16
    # start from converted checkpoints of these shapes (README: "start from a Hugging Face checkpoint")
    c.init.vision = dict(path="", into="vision", skip="")
    c.init.llm = dict(path="", into="llm", skip="")
    c.optim.update(lr_law="mm1", warmup_steps=20, lr_floor=0.1)
    c.train.update(steps=400, log_every=20, save_every=200)
    _evals(c)


def _sft(c, path="workdirs/mm1/export"):
    c.data.components = dict(
        # conversations of 4 question-answer turns per image
        qa=C.component(view="qa", format="qa", weight=1.0, num_records=4096, cache=True, turns=4),
    )
    c.model.seq_len = 192  # two 4-turn conversations per row
    c.init.mm1 = dict(path=path, into="", skip="")
    c.optim.update(lr_law="", lr=3e-3, warmup_steps=20, lr_floor=0.1)
    c.train.update(steps=300)
    c.evals = {}
    _evals(c, tasks=("vqa",), shots=(0,), n=128)


def _full(c, llm, moe=0):
    c.data.image_size = 336
    # max_text_tokens: each caption / text cut at this many tokens (0: none); an example that still
    # does not fit a row is skipped and counted
    c.data.components = dict(
        caption=C.component(view="caption", format="caption", weight=45.0, max_text_tokens=0),
        interleaved=C.component(view="interleaved", format="interleaved", weight=45.0, max_text_tokens=0),
        text=C.component(view="text", format="text", weight=10.0, max_text_tokens=0),
    )
    c.model = dict(
        vision=dict(vit.CLIP_L14, posemb_size=0),  # OpenAI CLIP-L/14-336 as hf-import states it
        connector=dict(kind="c_abstractor", num_tokens=144),
        # attention 'auto': cuDNN flash attention on GPUs, splash on TPUs (segment ids, no dense mask)
        llm=dict(**llm, moe=_moe(moe), attention="auto"),
        seq_len=4096,
        image_slots=16,
        # the LM head and cross-entropy 512 positions at a time: no [B, 4096, V] float32 logits
        loss_chunk=512,
        # images encoded per batch (of 512 x 16 slots; empty ones skipped): a batch with more on a
        # device than its share encodes every slot. Tune from the `image_fill` metric
        max_images=6144,
        subimages=False,
        tokenizer="",
        dtype="bfloat16",
        scan=True,
        remat="nothing_saveable",
    )
    # start from converted checkpoints: --config.init.vision.path=... --config.init.llm.path=...
    # (`mmjax convert hf-import`; set model.tokenizer to the LLM's HF folder too)
    c.init.vision = dict(path="", into="vision", skip="")
    c.init.llm = dict(path="", into="llm", skip="")
    # FSDP over every chip of a slice or node; mesh_dcn.data spans slices or nodes
    c.mesh.update(data=1, fsdp=-1)
    c.data.update(global_batch_size=512, num_workers=8)
    c.optim.update(lr_law="mm1", warmup_steps=2000, lr_floor=0.1)
    c.train.update(steps=200_000, log_every=100, save_every=2000, keep_period=20_000)
    _evals(c, n=512)


# Qwen2.5-3B- and TinyLlama-1.1B-shaped, so `mmjax convert hf-import` checkpoints load into them
LLM_3B = dict(
    width=2048,
    depth=36,
    num_heads=16,
    num_kv_heads=2,
    mlp_dim=11008,
    vocab_size=0,
    tie_embeddings=True,
    qkv_bias=True,
    rope_theta=1e6,
)
LLM_1B = llm.TINYLLAMA_1B


VARIANTS = (
    "tiny",
    "tiny_sft",
    "tiny_sft_hires",
    "tiny_sft_subimages",
    "tiny_pipeline",
    "1b",
    "3b",
    "3b_moe",
    "1b_pipeline",
)


def get_config(arg=None):
    variant = arg or "tiny"
    if variant.endswith("_pipeline"):  # pre-training, export, then SFT from it, as one run
        scale = variant.removesuffix("_pipeline")
        sft = get_config("tiny_sft") if scale == "tiny" else _full_sft(get_config(scale))
        return C.pipeline(("pretrain", get_config(scale), {}), ("sft", sft, {"init.mm1": "pretrain"}))
    c = C.base()
    c.recipe = "mm1"
    if variant.startswith("tiny"):
        _tiny(c)
        if variant == "tiny_sft":
            _sft(c)
        elif variant == "tiny_sft_hires":
            _sft(c)
            c.data.image_size, c.model.vision.posemb_size = 64, 32
        elif variant == "tiny_sft_subimages":
            _sft(c)
            c.data.image_size, c.model.subimages, c.model.image_slots = 64, True, 5
        elif variant != "tiny":
            raise C.ConfigError(f"unknown variant {variant!r}; variants: {', '.join(VARIANTS)}")
    elif variant in ("3b", "1b", "3b_moe"):
        _full(c, LLM_1B if variant == "1b" else LLM_3B, moe=8 if variant == "3b_moe" else 0)
        if variant == "3b_moe":  # the dense 3B's law value: N counts all experts, not the active ones
            c.optim.update(lr_law="", lr=5.75e-5, weight_decay=0.1)
    else:
        raise C.ConfigError(f"unknown variant {variant!r}; variants: {', '.join(VARIANTS)}")
    return c


def _full_sft(c):
    """SFT of a full-scale pre-training config: MM1's question -> answer data at the same scale."""
    c.data.components = dict(qa=C.component(view="qa", format="qa", weight=1.0, turns=4))
    c.init.mm1 = dict(path="", into="", skip="")
    c.optim.update(lr_law="", lr=2e-5, warmup_steps=500, lr_floor=0.1)
    c.train.update(steps=10_000)
    c.evals = {}
    _evals(c, tasks=("vqa",), shots=(0,), n=512)
    return c
