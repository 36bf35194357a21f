"""MM-GEM (arXiv 2405.19333): one LLM trained to embed text (`[EMB]`, InfoNCE against the image
embeddings of the global batch) and to caption images (`[CAP]`, cross-entropy), L = L_emb + L_gen.

`config.tasks` picks the objectives of a stage: `embed` + `caption` (stage 1, image-caption
pairs), `region_caption` (stage 2: RoIAlign region embedding -> h3 -> soft prompts -> the region's
caption) or `region_retrieval` (stage 2: h4 over region embeddings against the region captions'
text embeddings). A stage trains what `optim.freeze` leaves (configs/mmgem.py).

Examples: `images` [S, S, 3] uint8, `emb_tokens` ([BOS] text [EMB], padded) and `emb_mask`,
`cap_targets` (text EOS, padded) and `cap_mask`; region records add `boxes` [4] in pixels.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.config import ConfigError
from mmjax.data import pipeline, shapes, tokenizer as tok_lib
from mmjax.eval import artefacts, captioning, retrieval
from mmjax.models import mmgem
from mmjax.objectives import contrastive
from mmjax.objectives.cross_entropy import masked_chunked_cross_entropy
from mmjax.recipes.base import Evaluator, Export, Recipe as BaseRecipe
from mmjax.sampling import decode

TASKS = ("embed", "caption", "region_caption", "region_retrieval")
EVALS = ("retrieval", "zeroshot", "captioning", "region_retrieval", "region_captioning")
TEMPLATES = ("a {c} {s}", "a picture of a {c} {s}", "there is a {c} {s}")  # zero-shot prompts
CLASSES = tuple((c, s) for c in shapes.COLORS for s in shapes.SHAPES)


def to_float(images: jax.Array) -> jax.Array:
    return images.astype(jnp.float32) / 127.5 - 1.0


def plain(text: str) -> str:
    """Lower case, punctuation removed: the pre-tokenised form CIDEr-D compares."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


class Preprocess:
    """A record -> fixed-length arrays; texts are cut to fit `text_len` (never skipped). Picklable."""

    def __init__(self, tokenizer, text_len: int, image_size: int, region: bool, classes: bool = False):
        self.tok, self.text_len, self.size, self.region, self.classes = (
            tokenizer,
            text_len,
            image_size,
            region,
            classes,
        )
        self.ids = (
            tokenizer.bos_token_id,
            tokenizer.eos_token_id,
            tokenizer.convert_tokens_to_ids(tok_lib.EMB),
        )

    def text(self, s: str) -> dict:
        bos, eos, emb = self.ids
        L = self.text_len
        ids = self.tok.encode(s, add_special_tokens=False)[: L - 2]
        pad = self.tok.pad_token_id
        row = lambda x: np.asarray(x + [pad] * (L - len(x)), np.int32)  # noqa: E731
        return {
            "emb_tokens": row([bos, *ids, emb]),
            "emb_mask": np.arange(L) < len(ids) + 2,
            "cap_targets": row([*ids, eos]),
            "cap_mask": (np.arange(L) < len(ids) + 1).astype(np.float32),
        }

    def __call__(self, record: dict) -> dict:
        out = {"images": np.asarray(record["image"], np.uint8), **self.text(record["text"])}
        if "index" in record:
            out["index"] = np.int64(record["index"])
        if self.region:
            out["boxes"] = np.asarray(record["box"], np.float32) * self.size
        if self.classes:  # which colour-shape classes the scene holds (zero-shot scoring)
            n = int(record["num_objects"])
            present = {(int(c), int(s)) for c, s in zip(record["obj_color"][:n], record["obj_shape"][:n])}
            out["present"] = np.array(
                [(shapes.COLORS.index(c), shapes.SHAPES.index(s)) in present for c, s in CLASSES]
            )
        return out


class Recipe(BaseRecipe):
    def __init__(self, config):
        super().__init__(config)
        mc = config.model
        self.tokenizer = tok_lib.load(mc.tokenizer or None)
        self.emb_id, self.cap_id = tok_lib.add_special_tokens(self.tokenizer, (tok_lib.EMB, tok_lib.CAP))
        vocab = mc.llm.get("vocab_size") or len(self.tokenizer)
        if vocab < len(self.tokenizer):
            raise ConfigError(f"model.llm.vocab_size={vocab} < the tokenizer's {len(self.tokenizer)} tokens")
        try:
            self.model = mmgem.build(mc, vocab, self.emb_id, self.cap_id)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model config: {e}") from e
        bad = [t for t in config.tasks if t not in TASKS]
        if bad or not config.tasks:
            raise ConfigError(f"tasks={tuple(config.tasks)!r}; choose from {', '.join(TASKS)}")
        self.region = any(t.startswith("region") for t in config.tasks)
        if self.region and any(t in config.tasks for t in ("embed", "caption")):
            raise ConfigError(
                "tasks: a stage trains on whole images (embed, caption) or on regions, not both"
            )
        if "region_caption" in config.tasks and not mc.soft_prompts:
            raise ConfigError("tasks: region_caption trains the soft prompts; set model.soft_prompts > 0")
        if config.train.grad_accum > 1 and any("embed" in t or "retrieval" in t for t in config.tasks):
            raise ConfigError(
                "train.grad_accum > 1: the contrastive loss's negatives are the whole global batch, which "
                "micro-batches would split (the loss would change); use grad_accum=1 and a mesh that holds "
                "the batch (more data-parallel devices, or fsdp), or a smaller data.global_batch_size"
            )
        for name, c in config.data.components.items():
            if c.view not in ("caption", "region") and c.source == "shapes":
                raise ConfigError(
                    f"data.components.{name}.view={c.view!r}; MM-GEM reads caption or region records"
                )
        for name, spec in config.evals.items():
            if spec.task not in EVALS:
                raise ConfigError(f"evals.{name}.task={spec.task!r}; choose from {', '.join(EVALS)}")
        self.pre = Preprocess(self.tokenizer, mc.text_len, config.data.image_size, False)
        self.class_tokens = np.stack(
            [
                np.stack([self.pre.text(t.format(c=c, s=s))["emb_tokens"] for t in TEMPLATES])
                for c, s in CLASSES
            ]
        )  # [classes, templates, L]

    # ---- model ---------------------------------------------------------------------------------
    def init(self, rng):
        S, L = self.config.data.image_size, self.config.model.text_len
        images = jnp.zeros((1, S, S, 3), jnp.float32)
        boxes = jnp.array([[0.0, 0.0, S / 2, S / 2]], jnp.float32)
        tokens = jnp.full((1, L), self.emb_id, jnp.int32)
        return self.model.init(rng, images, boxes, tokens, jnp.ones((1, L), bool), tokens)

    def preprocess(self, component):
        return Preprocess(
            self.tokenizer, self.config.model.text_len, self.config.data.image_size, self.region
        )

    def _apply(self, params, method, *args, **kw):
        return self.model.apply({"params": params}, *args, method=method, **kw)

    def image_embedding(self, params, batch, region: bool):
        """v [B, E] of the images (or, for regions, of their boxes), unnormalised."""
        boxes = batch["boxes"] if region else None
        return self._apply(params, mmgem.MMGEM.image_embedding, to_float(batch["images"]), boxes)

    def embeddings(self, params, batch, region: bool, v=None):
        """(image embeddings, or h4 of region embeddings; text embeddings), L2-normalised [B, E]."""
        v = self.image_embedding(params, batch, region) if v is None else v
        if region:
            v = self._apply(params, mmgem.MMGEM.region_head, v)
        t = self._apply(params, mmgem.MMGEM.text_embedding, batch["emb_tokens"], batch["emb_mask"])
        return contrastive.normalise(v), contrastive.normalise(t)

    def loss(self, params, batch, ctx):
        tasks, metrics, total = self.config.tasks, {}, 0.0
        v = self.image_embedding(params, batch, self.region)  # one ViT pass for both objectives
        if "embed" in tasks or "region_retrieval" in tasks:
            image, text = self.embeddings(params, batch, self.region, v)
            scale = jnp.exp(params["logit_scale"])
            per_image, per_text = contrastive.clip_logits(image, text, scale)  # once: loss and accuracy
            emb = contrastive.loss_from_logits(per_image, per_text)
            hit = per_image.argmax(1) == jnp.arange(len(image))
            metrics.update(emb_loss=emb, logit_scale=scale, i2t_accuracy=hit.mean())
            total = total + emb
        if "caption" in tasks or "region_caption" in tasks:
            hidden = self._apply(
                params,
                mmgem.MMGEM.caption_logits,
                v,
                batch["cap_targets"],
                soft=self.region,
                return_hidden=True,
            )
            head = lambda h: self._apply(params, mmgem.MMGEM.logits, h)  # noqa: E731
            chunk = self.config.model.get("loss_chunk", 0)
            gen, _ = masked_chunked_cross_entropy(
                head, hidden, batch["cap_targets"], batch["cap_mask"], chunk
            )
            metrics["gen_loss"] = gen
            total = total + gen.value()
        return total, metrics

    def constrain(self, params, ctx):
        return {**params, "logit_scale": contrastive.clamp_logit_scale(params["logit_scale"])}

    # ---- evaluation ----------------------------------------------------------------------------
    def caption(self, params, images, boxes=None, max_new_tokens: int = 24):
        """Greedy captions [B, max_new_tokens] of images (or of their boxes, with the soft prompts)."""
        v = self._apply(params, mmgem.MMGEM.image_embedding, to_float(images), boxes)
        prompt = self._apply(params, mmgem.MMGEM.caption_prompt, v, soft=boxes is not None)
        ids, _ = decode.generate(
            self.model.llm,
            params["llm"],
            embeddings=prompt,
            prompt_mask=jnp.ones(prompt.shape[:2], bool),
            max_new_tokens=max_new_tokens,
            stop_tokens=(self.tokenizer.eos_token_id,),
            pad_id=self.tokenizer.pad_token_id,
        )
        return ids

    def to_texts(self, ids) -> list[str]:
        return [t.strip() for t in self.tokenizer.batch_decode(np.asarray(ids), skip_special_tokens=True)]

    def evaluators(self):
        out = {}
        for name, spec in self.config.evals.items():
            region = spec.task.startswith("region")
            pre = Preprocess(
                self.tokenizer,
                self.config.model.text_len,
                self.config.data.image_size,
                region,
                spec.task == "zeroshot",
            )
            out[name] = Evaluator(spec, pre, *getattr(self, f"_eval_{spec.task}")(spec))
        return out

    def _eval_retrieval(self, spec, region=False):
        def step(params, batch, ctx):
            v, t = self.embeddings(params, batch, region)
            return {"v": v, "t": t, "ids": batch["emb_tokens"], "images": batch["images"]}

        def finalize(o):
            scores = retrieval.image_text(o["v"], o["t"], o["ids"], ks=(1, 5, 10))
            return {**scores, "examples": self._examples(o)}

        return step, finalize

    def _eval_region_retrieval(self, spec):
        return self._eval_retrieval(spec, region=True)

    def _examples(self, o, queries: int = 4, top: int = 4) -> artefacts.Images:
        """Retrieval examples: for the first distinct texts, the `top` nearest images, each tile
        captioned with the query and whether the image is one it describes."""
        keep = retrieval.unique_rows(o["ids"])[:queries]
        same = retrieval.same_rows(o["ids"])
        sim = retrieval.normalise(o["t"][keep]) @ retrieval.normalise(o["v"]).T
        texts = self.to_texts(o["ids"][keep])
        tiles, captions = [], []
        for q, row in enumerate(np.argsort(-sim, axis=1)[:, :top]):
            for r, j in enumerate(row):
                tiles.append(o["images"][j])
                captions.append(f"{texts[q]} #{r + 1} {'yes' if same[keep[q], j] else 'no'}")
        return artefacts.Images(np.stack(tiles), tuple(captions), columns=top)

    def _eval_zeroshot(self, spec):
        def step(params, batch, ctx):
            v = contrastive.normalise(self.image_embedding(params, batch, False))
            tokens = jnp.asarray(self.class_tokens.reshape(-1, self.class_tokens.shape[-1]))
            t = self._apply(params, mmgem.MMGEM.text_embedding, tokens, tokens != self.tokenizer.pad_token_id)
            t = (
                contrastive.normalise(t).reshape(*self.class_tokens.shape[:2], -1).mean(1)
            )  # CLIP: mean over templates
            pred = (v @ contrastive.normalise(t).T).argmax(1)
            return {"pred": pred, "present": batch["present"]}

        def finalize(o):
            hit = np.take_along_axis(o["present"], o["pred"][:, None], 1)[:, 0]
            return {"accuracy": float(hit.mean()), "chance": float(o["present"].mean())}

        return step, finalize

    def _eval_captioning(self, spec, region=False):
        def step(params, batch, ctx):
            ids = self.caption(params, batch["images"], batch.get("boxes") if region else None)
            return {"ids": ids, "truth": batch["cap_targets"], "index": batch["index"]}

        def finalize(o):
            texts = self.to_texts(o["ids"])
            keys = range(len(texts))
            if region:  # one reference: the region's caption
                refs = {k: [plain(t)] for k, t in zip(keys, self.to_texts(o["truth"]))}
                scores = {"exact": float(np.mean([plain(t) == refs[k][0] for k, t in zip(keys, texts)]))}
            else:  # five template captions of the scene
                scenes = [shapes.scene(spec.split, int(i), pipeline.world_seed(spec)) for i in o["index"]]
                refs = {
                    k: [plain(shapes.caption(sc, np.random.default_rng((r, int(i))))) for r in range(5)]
                    for k, sc, i in zip(keys, scenes, o["index"])
                }
                scores = captioning.score(texts, o["index"], spec.split, pipeline.world_seed(spec))
            cider, _ = captioning.cider_d(refs, {k: plain(t) for k, t in zip(keys, texts)})
            rows = [{"caption": t, "references": refs[k]} for k, t in zip(keys, texts)][:32]
            return {**scores, "cider_d": cider, "captions": artefacts.Texts(tuple(rows))}

        return step, finalize

    def _eval_region_captioning(self, spec):
        return self._eval_captioning(spec, region=True)

    # ---- sampling and export -------------------------------------------------------------------
    def sample(self, params, prompts, num_samples, ctx):
        """A caption of each prompt's image (greedy: `num_samples` identical captions)."""
        size, rows = self.config.data.image_size, []
        for p in prompts:
            image = p.get("image")
            if image is None or np.asarray(image).shape[:2] != (size, size):
                raise ConfigError(f"MM-GEM captions an image: give --image REF.png of {size}x{size} px")
            ids = self.caption(params, np.asarray(image, np.uint8)[None])
            rows.append([{"text": self.to_texts(ids)[0]}] * num_samples)
        return rows

    def exports(self):
        mc = self.config.model.to_dict()
        mc["llm"]["vocab_size"] = self.model.llm.vocab_size
        return {"": Export("", {"kind": "mmgem", "model": mc}, self.tokenizer)}
