"""MM-GEM: one LLM that embeds text ([EMB], InfoNCE over the global batch) and captions images
([CAP]), joined to a ViT by h1 / h2 / h3; then stage 2 on regions (RoIAlign): region captioning
(only h3 and K soft prompts train) and region retrieval (only the identity-initialised h4 trains).

  mmjax train --config configs/mmgem.py:tiny --workdir workdirs/mmgem     # 3 stages, CPU minutes
  mmjax eval  --config configs/mmgem.py:tiny --workdir workdirs/mmgem     # retrieval, zero-shot, captions

Variants: tiny (the pipeline stage1 -> region_caption -> region_retrieval), tiny_stage1, and the
full scale `l14` (OpenCLIP ViT-L/14 + a TinyLlama-1.1B-shaped LLM, LAMB, global batch 81,920, text
length 50; the same three stages). Start from converted checkpoints with
`--config.stage1.init.vision.path=... --config.stage1.init.llm.path=...` (`mmjax convert hf-import`;
set model.tokenizer to the LLM's folder: [EMB] and [CAP] are added and the vocabulary grows).
"""

from mmjax import config as C
from mmjax.models import llm, vit

VARIANTS = ("tiny", "tiny_stage1", "l14", "l14_stage1")
BACKBONES = "^(vision|llm)/"  # the pre-trained towers: optim.groups scales their learning rate


def _evals(c, stage: str, n: int, captions: int, batch: int):
    tasks = {
        "stage1": ("retrieval", "zeroshot", "captioning"),
        "region_caption": ("region_captioning",),
        "region_retrieval": ("retrieval", "zeroshot", "captioning", "region_retrieval", "region_captioning"),
    }[stage]
    for task in tasks:
        view = "region" if task.startswith("region") else "caption"
        size = captions if "captioning" in task else n
        c.evals[task] = C.component(
            split="val", view=view, task=task, num_examples=size, batch_size=min(size, batch)
        )


def _stage(c, stage: str, soft_prompts: int, n: int, captions: int, batch: int):
    """Stage `stage` of the pipeline on config `c` (model and scale already set)."""
    c.model.soft_prompts = soft_prompts if stage != "stage1" else 0
    if stage == "stage1":
        c.tasks = ("embed", "caption")
        c.optim.freeze = ("^h4/",)  # h4 is stage 2's (region retrieval); it stays the identity
        c.init.vision = dict(path="", into="vision", skip="")
        c.init.llm = dict(path="", into="llm", skip="")
    else:
        c.tasks = (stage,)
        for comp in c.data.components.values():
            comp.view = "region"
        keep = "h3/|soft_prompts" if stage == "region_caption" else "h4/"
        c.optim.update(freeze=(f"^(?!{keep})",), groups=())  # everything else is frozen: no optimizer state
        c.init.mmgem = dict(path="", into="", skip="soft_prompts" if stage == "region_caption" else "")
    _evals(c, stage, n, captions, batch)
    return c


def _tiny():
    c = C.base()
    c.recipe = "mmgem"
    c.data.update(image_size=32, global_batch_size=64)
    c.data.components = dict(pairs=C.component(view="caption", num_records=4096, cache=True))
    c.model = dict(
        vision=dict(patch_size=4, width=64, depth=2, num_heads=4, mlp_dim=128, pixels="signed"),
        llm=dict(
            width=128, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=256, tie_embeddings=True, vocab_size=0
        ),
        embed_dim=64,
        context_tokens=4,
        soft_prompts=0,
        text_len=24,
        loss_chunk=0,  # > 0: the LM head + cross-entropy this many positions at a time
        tokenizer="",  # '' = the shapes tokenizer shipped with mmjax
        dtype="float32",
        scan=False,
        remat="",
    )
    c.optim.update(name="lamb", lr=5e-3, weight_decay=0.05, warmup_steps=20, lr_floor=0.1)
    c.train.update(steps=300, log_every=20, save_every=300)
    return c


def _l14():
    c = C.base()
    c.recipe = "mmgem"
    c.data.update(image_size=224, global_batch_size=81_920, num_workers=8)
    c.data.components = dict(pairs=C.component(view="caption"))
    c.model = dict(
        vision=dict(vit.CLIP_L14, act="gelu"),  # OpenCLIP ViT-L/14 (LAION), as hf-import states it
        llm=dict(llm.TINYLLAMA_1B, attention="auto"),  # cuDNN / splash kernels on GPU / TPU
        embed_dim=768,
        context_tokens=1,
        soft_prompts=0,
        text_len=50,
        loss_chunk=0,  # captions of 50 tokens: the full logits are small
        tokenizer="",
        dtype="bfloat16",
        scan=True,
        remat="nothing_saveable",
    )
    # FSDP over every chip of a slice or node; mesh_dcn.data spans slices or nodes
    c.mesh.update(data=1, fsdp=-1)
    # projections 5e-4, backbones 5e-5
    c.optim.update(name="lamb", lr=5e-4, weight_decay=0.05, warmup_steps=2000, groups=((BACKBONES, 0.1),))
    c.train.update(steps=100_000, log_every=100, save_every=2000)
    return c


def get_config(arg=None):
    variant = arg or "tiny"
    if variant not in VARIANTS:
        raise C.ConfigError(f"unknown variant {variant!r}; variants: {', '.join(VARIANTS)}")
    scale, base = ("tiny", _tiny) if variant.startswith("tiny") else ("l14", _l14)
    # eval sizes (retrieval / zero-shot, captioning), eval batch, soft prompts
    n, captions, batch, soft = (256, 64, 64, 4) if scale == "tiny" else (5120, 5120, 512, 64)
    if variant.endswith("_stage1"):
        return _stage(base(), "stage1", soft, n, captions, batch)
    s1 = _stage(base(), "stage1", soft, n, captions, batch)
    s2a = _stage(base(), "region_caption", soft, n, captions, batch)
    s2b = _stage(base(), "region_retrieval", soft, n, captions, batch)
    if scale == "tiny":
        s2a.train.steps = s2b.train.steps = 150
    else:
        s2a.train.steps = s2b.train.steps = 10_000
    return C.pipeline(
        ("stage1", s1, {}),
        ("region_caption", s2a, {"init.mmgem": "stage1"}),
        ("region_retrieval", s2b, {"init.mmgem": "region_caption"}),
    )
