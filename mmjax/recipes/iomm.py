"""IOMM (arXiv 2603.16139): a flow-matching MM-DiT conditioned by a frozen MLLM, pre-trained on
images alone (the MLLM's view of the target image as the condition, masked image modelling, a
Residual Query Adapter), then fine-tuned on image-only data mixed with a few text-image pairs.

Every example is a condition and a target image. The condition is a token row of
`model.cond_len` (right-padded, `mask` marks real tokens) with `<image>` placeholders where the
reference image's visual tokens go:
  image-only   [BOS] model.prompt <image> x T        (reference = the target image)
  text         [BOS] caption                         (reference unused)
  edit         [BOS] instruction <image> x T         (reference = the image to edit)
  empty        [BOS]                                 (classifier-free guidance's unconditional
               branch; an edit keeps its image: [BOS] <image> x T)
Time convention (mmjax.objectives.flow_matching): t = 1 is noise, t = 0 is data.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from mmjax import weights
from mmjax.config import ConfigError
from mmjax.data import pipeline, shapes, tokenizer as tok_lib
from mmjax.eval import artefacts, shapes_eval
from mmjax.models import autoencoder_kl, vlm
from mmjax.models.iomm import IOMM
from mmjax.models.mmdit import MMDiT
from mmjax.objectives import flow_matching as fm
from mmjax.objectives.reduce import Mean
from mmjax.recipes.base import Evaluator, Export, Recipe as BaseRecipe
from mmjax.sampling import flow

FORMATS = ("image", "caption")  # image-only, and text-image pairs
# evaluators: GenEval prompts, edits, image-only conditions, the flow loss on held-out data
TASKS = ("t2i", "edit", "reconstruct", "loss")


def to_float(images: jax.Array) -> jax.Array:
    return images.astype(jnp.float32) / 127.5 - 1.0


def to_uint8(x: jax.Array) -> jax.Array:
    return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


class Conditions:
    """Builds condition token rows (picklable: runs in the data workers)."""

    def __init__(self, tokenizer, cond_len: int, prompt: str, num_tokens: int):
        self.tok, self.cond_len, self.prompt, self.num_tokens = tokenizer, cond_len, prompt, num_tokens
        self.bos, self.pad = tokenizer.bos_token_id, tokenizer.pad_token_id
        self.image_id = tokenizer.convert_tokens_to_ids(tok_lib.IMAGE)

    def row(
        self, text: str = "", image: bool = False, what: str = "the condition", truncate: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, mask) of [BOS, text, image tokens]; `truncate`: the text is cut to fit (training
        captions, as CLIP / T5 conditioning cuts at its length), else a text too long is an error."""
        text_ids = self.tok.encode(text, add_special_tokens=False) if text else []
        images = [self.image_id] * (self.num_tokens if image else 0)
        if truncate:
            text_ids = text_ids[: max(self.cond_len - 1 - len(images), 0)]
        ids = [self.bos] + text_ids + images
        if len(ids) > self.cond_len:
            raise ConfigError(
                f"{what} {text!r} needs {len(ids)} tokens but model.cond_len={self.cond_len}; "
                "shorten it or raise model.cond_len"
            )
        tokens = np.full(self.cond_len, self.pad, np.int32)
        tokens[: len(ids)] = ids
        return tokens, np.arange(self.cond_len) < len(ids)

    def image_only(self):
        return self.row(self.prompt, image=True, what="model.prompt")


class Preprocess:
    def __init__(self, conds: Conditions, kind: str):
        self.conds, self.kind = conds, kind

    def __call__(self, record: dict) -> dict:
        image = record["image"]
        if self.kind == "image":
            tokens, mask = self.conds.image_only()
        else:
            tokens, mask = self.conds.row(record["text"], what="the caption", truncate=True)
        out = {"tokens": tokens, "mask": mask, "ref": image[None], "image": image}
        return {**out, "index": np.int32(record["index"])} if "index" in record else out


class PromptPreprocess:
    """A GenEval prompt record (or a shapes-world edit record) -> condition, its unconditional
    branch and the reference image."""

    def __init__(self, conds: Conditions, task: str, image_size: int):
        self.conds, self.task, self.size = conds, task, image_size

    def __call__(self, record: dict) -> dict:
        if self.task == "edit":
            tokens, mask = self.conds.row(record["instruction"], image=True, what="the instruction")
            un_tokens, un_mask = self.conds.row(image=True)
            ref = record["image"]
        elif self.task == "reconstruct":  # stage 1's own task: the image back from the MLLM's view of it
            tokens, mask = self.conds.image_only()
            un_tokens, un_mask = self.conds.row()
            ref = record["image"]
        else:
            tokens, mask = self.conds.row(record["text"], what="the prompt")
            un_tokens, un_mask = self.conds.row()
            ref = np.zeros((self.size, self.size, 3), np.uint8)
        return {
            "tokens": tokens,
            "mask": mask,
            "un_tokens": un_tokens,
            "un_mask": un_mask,
            "ref": ref[None],
            "index": np.int32(record["index"]),
        }


class Recipe(BaseRecipe):
    def __init__(self, config):
        super().__init__(config)
        mc = config.model
        mllm_model, self.tokenizer = self._mllm()
        tok_lib.add_special_tokens(self.tokenizer, (tok_lib.IMAGE,))
        if mllm_model.get("subimages"):
            raise ConfigError("the frozen MLLM reads sub-images; IOMM conditions on one image per slot")
        num_tokens = mllm_model["connector"]["num_tokens"]
        self.conds = Conditions(self.tokenizer, mc.cond_len, mc.prompt, num_tokens)
        self.conds.image_only()  # the image-only condition must fit
        vocab = mllm_model["llm"].get("vocab_size") or len(self.tokenizer)
        dtype = jnp.dtype(mc.dtype)
        try:
            mllm = vlm.build(mllm_model, vocab, self.conds.image_id)
            mllm = mllm.clone(llm=mllm.llm.clone(hidden_layer=mc.mllm_layer))
            vae = self._vae()
            self.model = IOMM(
                mllm=mllm,
                generator=MMDiT(
                    **mc.generator,
                    in_channels=3 if vae is None else vae.latent_channels,
                    cond_dim=mllm.llm.width,
                    pooled_dim=mllm.llm.width if mc.adapter.pooled else 0,
                    dtype=dtype,
                ),
                vae=vae,
                **mc.adapter,
                dtype=dtype,
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model config: {e}") from e
        self.names = sorted(config.data.components)
        for name in self.names:
            if config.data.components[name].get("format", "") not in FORMATS:
                raise ConfigError(f"data.components.{name}.format: choose one of {', '.join(FORMATS)}")
        for name, spec in config.evals.items():
            if spec.get("task") not in TASKS:
                raise ConfigError(f"evals.{name}.task={spec.get('task')!r}: choose one of {', '.join(TASKS)}")
            if spec.task == "edit" and spec.view != "edit":
                raise ConfigError(
                    f"evals.{name}: an edit needs a reference image; use view='edit' (got {spec.view!r})"
                )

    def _mllm(self):
        """(the frozen MLLM's model config, its tokenizer): from its export when it exists (a
        pipeline's earlier stage, an `mmjax export` of an MM1 run), else from model.mllm."""
        spec = self.config.frozen.get("mllm")
        path = spec.path if spec else ""
        if path and (epath.Path(path) / weights.META).exists():
            try:
                mc, tok = weights.vlm_spec(path)
            except ConfigError as e:
                raise ConfigError(f"frozen.mllm: {e}") from e
            return mc.to_dict(), tok
        mm = self.config.model.mllm.to_dict()
        return mm, tok_lib.load(mm.get("tokenizer") or None)

    def _vae(self):
        """The frozen autoencoder whose latents the generator makes (frozen.vae), or None: pixels."""
        spec = self.config.frozen.get("vae")
        if spec is None:
            return None
        if spec.path and (epath.Path(spec.path) / weights.META).exists():
            meta = weights.read_meta(spec.path)
            if meta.get("kind") != "autoencoder_kl":
                raise ConfigError(
                    f"frozen.vae: {spec.path} holds a {meta.get('kind')!r} model; convert a diffusers "
                    "AutoencoderKL folder with `mmjax convert hf-import`"
                )
        else:
            meta = {"kind": "autoencoder_kl", "model": self.config.model.vae.to_dict()}
        vae = autoencoder_kl.from_meta(meta)
        if self.config.data.image_size % vae.downsample_factor:
            raise ConfigError(
                f"data.image_size={self.config.data.image_size} is not a multiple of the autoencoder's "
                f"downsampling factor {vae.downsample_factor}"
            )
        return vae

    # ---- model ----------------------------------------------------------------------------
    def init(self, rng):
        s = self.config.data.image_size
        r = self.config.model.mllm_image_size or s
        tokens, mask = (jnp.asarray(a)[None] for a in self.conds.image_only())
        refs, images = jnp.zeros((1, 1, r, r, 3)), jnp.zeros((1, s, s, 3))
        return self.model.init(rng, tokens, mask, refs, images, jnp.zeros((1,)))

    def preprocess(self, component):
        return Preprocess(self.conds, self.config.data.components[component].format)

    def condition(self, params, tokens, mask, refs, **mim):
        size = self.config.model.mllm_image_size
        refs = to_float(refs)
        if size and refs.shape[2] != size:  # the MLLM reads references at its own resolution
            refs = jax.image.resize(refs, (*refs.shape[:2], size, size, 3), "bilinear")
        return self.model.apply({"params": params}, tokens, mask, refs, method=IOMM.condition, **mim)

    def loss(self, params, batch, ctx):
        fc = self.config.model.flow
        k_t, k_z, k_drop, k_mim = jax.random.split(ctx.rng, 4)
        x = self.model.apply({"params": params}, to_float(batch["image"]), method=IOMM.to_target)
        B = x.shape[0]
        keep = jax.random.bernoulli(k_drop, 1.0 - fc.cond_dropout, (B, 1))
        mask = batch["mask"] & (keep | (jnp.arange(batch["mask"].shape[1]) == 0))  # dropped: [BOS] only
        mim = self.config.model.mim
        h, hm = self.condition(
            params,
            batch["tokens"],
            mask,
            batch["ref"],
            mim_rng=k_mim,
            mim_ratio=mim.ratio,
            per_element=mim.per_element,
        )
        t = fm.sample_time(k_t, (B,), fc.time, fc.time_mean, fc.time_std, fc.shift)
        z = jax.random.normal(k_z, x.shape, x.dtype)
        v = self.model.apply({"params": params}, fm.noisy(x, z, t), t, h, hm, method=IOMM.velocity)
        err = ((v.astype(jnp.float32) - fm.target(x, z)) ** 2).mean((1, 2, 3))
        metrics = {f"loss/{n}": Mean.of(err, batch["_component"] == c) for c, n in enumerate(self.names)}
        return Mean.of(err), metrics

    # ---- sampling ---------------------------------------------------------------------------
    def generate(self, params, batch, rng, sc=None):
        """Images uint8 [B, S, S, 3] for a batch of conditions (tokens, mask, un_tokens, un_mask, ref):
        Euler over the sigma schedule with classifier-free guidance, the loop inside jit."""
        sc = sc or self.config.model.sample
        h, hm = self.condition(params, batch["tokens"], batch["mask"], batch["ref"])
        hu, hum = self.condition(params, batch["un_tokens"], batch["un_mask"], batch["ref"])

        def velocity(x, t, cond):
            return self.model.apply({"params": params}, x, t, cond["h"], cond["mask"], method=IOMM.velocity)

        z = jax.random.normal(rng, (h.shape[0], *self.target_shape()))
        x = flow.euler(
            flow.cfg(velocity, {"h": h, "mask": hm}, {"h": hu, "mask": hum}, sc.cfg),
            z,
            flow.sigmas(sc.steps, sc.shift),
        )
        return to_uint8(self.model.apply({"params": params}, x, method=IOMM.from_target))

    def target_shape(self) -> tuple[int, int, int]:
        s, vae = self.config.data.image_size, self.model.vae
        return (s, s, 3) if vae is None else (s // vae.downsample_factor,) * 2 + (vae.latent_channels,)

    def sample(self, params, prompts, num_samples, ctx):
        s = self.config.data.image_size
        rows = []
        for p in prompts:  # validate everything before anything compiles
            image = p.get("image")
            if p.get("task") == "edit" and image is None:
                raise ConfigError(f"the edit {p.get('text', '')!r} needs a reference image (--image REF.png)")
            if image is not None and np.asarray(image).shape[:2] != (s, s):
                raise ConfigError(
                    f"the reference image is {image.shape[1]}x{image.shape[0]} px; this model makes {s}x{s}"
                )
            record = {"index": len(rows), "text": p.get("text", ""), "instruction": p.get("text", "")}
            task = "edit" if image is not None else "t2i"
            if image is not None:
                record["image"] = np.asarray(image, np.uint8)
            rows.append(PromptPreprocess(self.conds, task, s)(record))
        if not hasattr(self, "_sampler"):
            self._sampler = jax.jit(self.generate)
        jobs = [row for row in rows for _ in range(num_samples)]
        images, chunk = [], self.config.model.sample.batch_size
        for c in range(0, len(jobs), chunk):  # fixed-size batches: one compilation for any prompts
            part = jobs[c : c + chunk]
            part += [part[-1]] * (chunk - len(part))
            batch = {k: np.stack([row[k] for row in part]) for k in part[0]}
            out = np.asarray(self._sampler(params, batch, jax.random.fold_in(ctx.rng, c)))
            images += list(out[: len(jobs) - c])
        return [
            [{"image": images[i * num_samples + j]} for j in range(num_samples)] for i in range(len(rows))
        ]

    # ---- evaluation ---------------------------------------------------------------------------
    def held_out_loss(self, params, batch, num_times: int = 8):
        """Per example, the flow loss averaged over `num_times` evenly spaced t with noise fixed by
        the example's index: no condition dropout or masking, the same draws at every evaluation
        (and in every run), so checkpoints and ablations compare on one sample."""
        x = self.model.apply({"params": params}, to_float(batch["image"]), method=IOMM.to_target)
        h, hm = self.condition(params, batch["tokens"], batch["mask"], batch["ref"])
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(batch["index"])

        def err(k):
            t = jnp.full((x.shape[0],), (k + 0.5) / num_times)
            z = jax.vmap(lambda key: jax.random.normal(jax.random.fold_in(key, k), x.shape[1:]))(keys)
            v = self.model.apply({"params": params}, fm.noisy(x, z, t), t, h, hm, method=IOMM.velocity)
            return ((v.astype(jnp.float32) - fm.target(x, z)) ** 2).mean((1, 2, 3))

        return jax.lax.map(err, jnp.arange(num_times)).T  # [B, num_times]

    def evaluators(self):
        out, s = {}, self.config.data.image_size
        for name, spec in self.config.evals.items():
            if spec.task == "loss":
                pre = Preprocess(self.conds, "image" if spec.view == "image" else "caption")
                step = lambda p, b, ctx: {"err": self.held_out_loss(p, b)}  # noqa: E731
                out[name] = Evaluator(spec, pre, step, HeldOutLoss())
                continue
            pre = PromptPreprocess(self.conds, spec.task, s)

            def step(params, batch, ctx):
                return {"image": self.generate(params, batch, ctx.rng), "index": batch["index"]}

            fin = {"t2i": shapes_eval.GenEval, "edit": EditScore, "reconstruct": Reconstruction}[spec.task](spec)
            out[name] = Evaluator(spec, pre, step, fin)
        return out

    def exports(self):
        g = self.model.generator
        skip = {"parent", "name", "dtype", "param_dtype"}
        kwargs = {f.name: getattr(g, f.name) for f in dataclasses.fields(g) if f.name not in skip}
        return {
            "": Export("", {"kind": "iomm", "model": self.config.model.to_dict()}),
            "generator": Export("generator", {"kind": "mmdit", "model": kwargs}),
        }


class EditScore:
    """Shapes-world edits: success (the asked change is there) and preservation (the objects the
    instruction does not touch are unchanged), with a grid of references and edits."""

    def __init__(self, spec):
        self.source = shapes.ShapesSource(
            split=spec.split, view="edit", num_records=spec.num_examples, seed=pipeline.world_seed(spec)
        )

    def __call__(self, out: dict) -> dict:
        ok, kept, grid, labels = [], [], [], []
        for i, image in zip(out["index"], out["image"]):
            r = self.source[int(i)]
            src = shapes.scene_from_arrays(
                *(r[k] for k in ("num_objects", "obj_shape", "obj_color", "obj_size", "obj_box"))
            )
            tgt = shapes.scene_from_arrays(
                *(r["target_" + k] for k in ("num_objects", "obj_shape", "obj_color", "obj_size", "obj_box"))
            )
            success, preserved = shapes_eval.edit_score(image, src, tgt)
            ok.append(success)
            kept.append(preserved)
            if len(grid) < 32:
                grid += [r["image"], image]
                labels += [r["instruction"], "ok" if success else "miss"]
        return {
            "success": float(np.mean(ok)),
            "preservation": float(np.mean(kept)),
            "correct": float(np.mean(np.logical_and(ok, kept))),  # a blank image or a copy scores 0
            "edits": artefacts.Images(np.stack(grid), tuple(labels), columns=8),
        }


class HeldOutLoss:
    """The held-out flow loss, overall and in thirds of t (low, mid, high noise)."""

    def __call__(self, out: dict) -> dict:
        err = np.asarray(out["err"], np.float64)
        thirds = np.array_split(err, 3, axis=1)
        return {
            "loss": float(err.mean()),
            "loss_se": float(err.mean(1).std(ddof=1) / np.sqrt(len(err))) if len(err) > 1 else 0.0,
            **{f"loss/t_{n}": float(part.mean()) for n, part in zip(("low", "mid", "high"), thirds)},
        }


class Reconstruction:
    """Image-only conditions: the share of images drawn back with exactly the reference's objects
    (shape, colour, size), and a grid of references next to their reconstructions."""

    def __init__(self, spec):
        self.source = shapes.ShapesSource(
            split=spec.split, view="image", num_records=spec.num_examples, seed=pipeline.world_seed(spec)
        )

    def __call__(self, out: dict) -> dict:
        refs = [self.source[int(i)]["image"] for i in out["index"]]
        scenes = [shapes.scene(self.source.split, int(i), self.source.seed) for i in out["index"]]
        ok = [shapes_eval.matches_scene(im, sc) for im, sc in zip(out["image"], scenes)]
        pairs = [im for pair in zip(refs[:16], out["image"][:16]) for im in pair]
        labels = [t for k in ok[:16] for t in ("reference", "same" if k else "differs")]
        mse = [np.mean((im / 255.0 - ref / 255.0) ** 2) for im, ref in zip(out["image"], refs)]
        return {
            "exact": float(np.mean(ok)),
            "pixel_mse": float(np.mean(mse)),  # in [0, 1] units: graded, where `exact` is all or nothing
            "grid": artefacts.Images(np.stack(pairs), tuple(labels), columns=8),
        }
