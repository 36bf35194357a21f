"""ViT trained to recognise the shapes world's objects (multi-label colour x shape).

  mmjax train --config configs/vit_shapes.py:tiny --workdir /tmp/vit_shapes
Variants: tiny (CPU/CI, under a minute on 2 cores), base (ViT-B/4 at 64px, a GPU/TPU host).
"""

from mmjax import config as C


VARIANTS = ("tiny", "base")


def get_config(arg=None):
    variant = arg or "tiny"
    c = C.base()
    c.recipe = "vit_shapes"
    c.data.components.shapes = C.component(split="train", view="image")
    c.evals.val = C.component(split="val", view="image", num_examples=512, batch_size=64)
    c.train.ema_decay = 0.0
    if variant == "tiny":
        # 4096 rendered records held in memory (~12 MB): rendering on the fly would cost the
        # 2-core CI host more than the train step itself (BENCHMARKS.md, input pipeline).
        c.data.components.shapes.update(num_records=4096, cache=True)
        c.model = dict(
            patch_size=4,
            width=64,
            depth=2,
            num_heads=4,
            mlp_dim=128,
            pool="map",
            dtype="float32",
            scan=False,
            remat="",
        )
        c.data.global_batch_size = 32
        c.optim.lr, c.optim.warmup_steps = 3e-3, 20
        c.train.update(steps=300, log_every=20, save_every=100, eval_every=0)
    elif variant == "base":
        c.data.image_size = 64
        c.model = dict(
            patch_size=4,
            width=768,
            depth=12,
            num_heads=12,
            mlp_dim=3072,
            pool="gap",
            dtype="bfloat16",
            scan=True,
            remat="nothing_saveable",
        )
        c.data.global_batch_size = 1024
        c.data.num_workers = 8
        c.mesh.update(data=-1, fsdp=8)
        c.optim.update(lr=1e-3, warmup_steps=1000, weight_decay=0.05)
        c.train.update(steps=50_000, log_every=100, save_every=2000, eval_every=5000, ema_decay=0.9999)
        c.evals.val.num_examples = 2048
    else:
        raise C.ConfigError(f"unknown variant {variant!r}; variants: {', '.join(VARIANTS)}")
    return c
