"""UniCode stage 1: the VQ tokenizer whose codes are LLM token ids, trained to reconstruct images
(language-driven EMA codebook by default; `--config.model.codebook.mode=frozen` for the frozen
LLM table).

  mmjax train --config configs/unicode.py:tiny --workdir workdirs/unicode   # CPU minutes
  mmjax eval  --config configs/unicode.py:tiny --workdir workdirs/unicode   # PSNR, usage, grids

Variants: tiny (32 px shapes, a 128-wide LLM table, 256 codes, 8x8x2 code map) and full scale
`7b` (256 px, a LLaMA-2-7B table (32,000 x 4,096), 16,384 codes, a 16x16x4 code map); start it from
a converted LLM with `--config.init.llm.path=...` (`mmjax convert hf-import`).
"""

from mmjax import config as C

VARIANTS = ("tiny", "7b")


def _codebook(**kw):
    return dict(
        mode="language", decay=0.99, eps=1e-5, beta=0.25, ramp=(0.1, 0.8), dead_threshold=1.0, chunk=0, **kw
    )


def get_config(arg=None):
    variant = arg or "tiny"
    if variant not in VARIANTS:
        raise C.ConfigError(f"unknown variant {variant!r}; variants: {', '.join(VARIANTS)}")
    c = C.base()
    c.recipe = "unicode"
    c.init.llm = dict(path="", into="llm", skip="")
    c.optim.freeze = ("^llm/", "^connector/")  # stage 1 trains the tokenizer only
    if variant == "tiny":
        c.data.update(image_size=32, global_batch_size=32)
        c.data.components = dict(images=C.component(view="image", num_records=2048, cache=True))
        c.model = dict(
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
            codebook=_codebook(),
            dtype="float32",
        )
        c.optim.update(lr=2e-3, warmup_steps=20)
        c.train.update(steps=300, log_every=20, save_every=300)
        c.evals.reconstruct = C.component(
            split="val", view="image", task="reconstruct", num_examples=64, batch_size=32
        )
        return c
    c.data.update(image_size=256, global_batch_size=256, num_workers=8)
    c.data.components = dict(images=C.component(view="image"))
    c.model = dict(
        vq=dict(
            depth=4,
            aggregate="concat",
            block_out_channels=(128, 128, 256, 256, 512),
            layers_per_block=2,
            latent_channels=256,
            norm_num_groups=32,
        ),
        llm=dict(vocab_size=32000, width=4096, depth=32, num_heads=32, mlp_dim=11008),  # LLaMA-2-7B
        num_codes=16384,
        codebook=_codebook(),
        dtype="bfloat16",
    )
    c.mesh.update(data=-1, fsdp=8)
    c.optim.update(lr=1e-4, warmup_steps=2000)
    c.train.update(steps=200_000, log_every=100, save_every=5000)
    c.evals.reconstruct = C.component(
        split="val", view="image", task="reconstruct", num_examples=1024, batch_size=64
    )
    return c
