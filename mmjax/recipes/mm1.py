"""MM1 (arXiv 2403.09611): image encoder -> connector -> LLM, pre-trained on a mixture of
captioned images, interleaved image-text documents and text-only data (optionally synthetic
captions), then SFT on question -> answer; zero- and few-shot captioning and VQA evaluation.

Every component's examples become `tokens` (the LLM input, `<image>` x T per image),
`targets` (the next token), `loss_mask` (1 where the target is text to learn) and `component`
(its index, for per-component losses), plus `images` [k, S, S, 3] uint8. The recipe packs
them (`packing()`) into rows of `model.seq_len` tokens and `model.image_slots` images with
segment ids: attention stays inside a document and positions restart per document.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mmjax import weights
from mmjax.config import ConfigError
from mmjax.data import pipeline, shapes, tokenizer as tok_lib
from mmjax.eval import captioning, vqa
from mmjax.eval.few_shot import FewShot
from mmjax.models import vlm
from mmjax.models.vlm import VLM
from mmjax.objectives.cross_entropy import masked_chunked_cross_entropy
from mmjax.objectives.reduce import Mean, Sum
from mmjax.recipes.base import Evaluator, Export, Recipe as BaseRecipe
from mmjax.sampling import decode

FORMATS = ("caption", "interleaved", "text", "synthetic", "qa")


# ---- images -----------------------------------------------------------------------------------
def decompose(image: np.ndarray) -> np.ndarray:
    """Sub-image decomposition: [S, S, 3] -> [5, S/2, S/2, 3], the 2x2 crops and the whole image
    downscaled 2x (MM1's higher-resolution SFT: the encoder keeps its resolution)."""
    s = image.shape[0] // 2
    crops = [image[i * s : (i + 1) * s, j * s : (j + 1) * s] for i in range(2) for j in range(2)]
    overview = image.reshape(s, 2, s, 2, 3).mean((1, 3)).round().astype(image.dtype)
    return np.stack([*crops, overview])


def to_float(images: jax.Array) -> jax.Array:
    return images.astype(jnp.float32) / 127.5 - 1.0


def dense_caption(record: dict) -> str:
    """A synthetic caption: every object with its size, colour and shape (VeCap-style detail)."""
    return " and ".join(f"a {o.size} {o.color} {o.shape}" for o in _scene(record).objects)


def _scene(record: dict) -> shapes.Scene:
    return shapes.scene_from_arrays(
        *(record[k] for k in ("num_objects", "obj_shape", "obj_color", "obj_size", "obj_box"))
    )


# ---- text -------------------------------------------------------------------------------------
class Formatter:
    """Builds token sequences from pieces: text (trained or not), images, EOS. Picklable."""

    def __init__(self, tokenizer, num_tokens: int, subimages: bool, vit_size: int):
        self.tok, self.subimages, self.vit_size = tokenizer, subimages, vit_size
        self.per_image = num_tokens * (5 if subimages else 1)
        self.bos, self.eos, self.image_id = (
            tokenizer.bos_token_id,
            tokenizer.eos_token_id,
            tokenizer.convert_tokens_to_ids(tok_lib.IMAGE),
        )

    def text(self, s: str, train: bool, limit: int = 0):
        """A text's ids (the first `limit` when limit > 0) and train flags."""
        ids = self.tok.encode(s, add_special_tokens=False)
        ids = ids[:limit] if limit > 0 else ids
        return ids, [train] * len(ids)

    def image(self):
        return [self.image_id] * self.per_image, [False] * self.per_image

    def pictures(self, images: list[np.ndarray]) -> np.ndarray:
        """Images [k, S, S, 3] uint8 as the encoder sees them (k = 0 for text-only)."""
        if not images:
            return np.zeros((0, self.vit_size, self.vit_size, 3), np.uint8)
        if self.subimages:
            images = [sub for im in images for sub in decompose(im)]
        return np.stack(images).astype(np.uint8)

    def join(self, pieces, eos: bool):
        """[BOS] + pieces (+ EOS, trained): (ids, train flags)."""
        ids, flags = [self.bos], [False]
        for p_ids, p_flags in pieces:
            ids += p_ids
            flags += p_flags
        if eos:
            ids.append(self.eos)
            flags.append(True)
        return np.asarray(ids, np.int32), np.asarray(flags, bool)


def qa_prompt(question: str) -> str:
    return f"Question: {question} Answer:"


def conversation(record: dict, turns: int) -> list[tuple[str, str]]:
    """The record's (question, answer) and turns - 1 more about the same scene (multi-turn SFT:
    more supervision per image), never about the split's held-out combinations."""
    pairs = [(record["question"], record["answer"])]
    if turns > 1:
        sc = _scene(record)
        allowed = lambda c, s: record["split"] == "test" or (c, s) not in shapes.HELD_OUT  # noqa: E731
        rng = np.random.default_rng((11, int(record["index"])))
        pairs += [shapes.qa(sc, rng, allowed) for _ in range(turns - 1)]
    return pairs


class Preprocess:
    """One component's record -> an example ready for packing. Captions and documents are cut at
    `max_text_tokens` per text (> 0; answers never are); an example that still does not fit a row
    comes back as a skip, which the stream drops and counts (a long web caption never ends a run)."""

    def __init__(
        self,
        fmt: Formatter,
        kind: str,
        component: int,
        seq_len: int,
        image_slots: int,
        turns: int = 1,
        max_text_tokens: int = 0,
    ):
        self.f, self.kind, self.component, self.turns = fmt, kind, component, turns
        self.seq_len, self.image_slots, self.limit = seq_len, image_slots, max_text_tokens

    def __call__(self, record: dict) -> dict:
        f, images = self.f, []
        if self.kind in ("caption", "synthetic", "qa"):
            images = [record["image"]]
        elif self.kind == "interleaved":
            images = list(record["images"])
        if self.kind == "caption":
            pieces = [f.image(), f.text(record["text"], True, self.limit)]
        elif self.kind == "synthetic":
            pieces = [f.image(), f.text(dense_caption(record), True)]
        elif self.kind == "interleaved":
            pieces = [p for text in record["texts"] for p in (f.image(), f.text(text, True, self.limit))]
        elif self.kind == "text":
            pieces = [f.text(record["text"], True, self.limit)]
        else:  # qa: a conversation about the image, the loss on the answers only
            pieces = [f.image()]
            for q, a in conversation(record, self.turns):  # each answer ends its turn with EOS
                pieces += [f.text(qa_prompt(q), False), f.text(a, True), ([f.eos], [True])]
        ids, flags = f.join(pieces, eos=self.kind != "qa")
        n, pics = len(ids) - 1, f.pictures(images)
        if n > self.seq_len:
            return {"index": record["index"], "_skip": "more tokens than model.seq_len"}
        if len(pics) > self.image_slots:
            return {"index": record["index"], "_skip": "more images than model.image_slots"}
        return {
            "tokens": ids[:-1],
            "targets": ids[1:],
            "loss_mask": flags[1:].astype(np.float32),
            "component": np.full(n, self.component, np.int32),
            "images": pics,
        }


# ---- evaluation -------------------------------------------------------------------------------
class Score:
    """Generated ids -> accuracy against the scorer (captions: every claim true of the scene;
    VQA: the exact answer, and the image-blind answer prior, also per question kind)."""

    def __init__(self, tokenizer, task: str, split: str, seed: int):
        self.tok, self.task, self.split, self.seed = tokenizer, task, split, seed

    def __call__(self, out: dict) -> dict:
        texts = self.tok.batch_decode(out["ids"], skip_special_tokens=True)
        scorer = captioning.score if self.task == "caption" else vqa.score
        return scorer(texts, out["index"], self.split, self.seed)


def module_kwargs(module) -> dict:
    """A module's architecture fields (not its dtype, scan or remat), as a weights folder states them."""
    skip = {"parent", "name", "dtype", "param_dtype", "scan", "remat", "attention"}
    out = {f.name: getattr(module, f.name) for f in dataclasses.fields(module) if f.name not in skip}
    return {k: (dict(v) if hasattr(v, "items") else v) for k, v in out.items()}


def llm_kwargs(llm) -> dict:
    """The LLM module's architecture as the kwargs of an `llm` weights folder (hf-export reads them)."""
    # resolved, as an import states them
    return {**module_kwargs(llm), "head_dim": llm.head_size, "num_kv_heads": llm.kv_heads}


class Recipe(BaseRecipe):
    def __init__(self, config):
        super().__init__(config)
        mc = config.model
        self.tokenizer = tok_lib.load(mc.tokenizer or None)
        tok_lib.add_special_tokens(self.tokenizer, (tok_lib.IMAGE,))  # an HF LLM's tokenizer lacks <image>
        self.fmt = Formatter(self.tokenizer, mc.connector.num_tokens, mc.subimages, self.vit_size())
        vocab = mc.llm.get("vocab_size") or len(self.tokenizer)
        if vocab < len(self.tokenizer):
            raise ConfigError(f"model.llm.vocab_size={vocab} < the tokenizer's {len(self.tokenizer)} tokens")
        try:
            self.model = vlm.build(mc, vocab, self.fmt.image_id)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model config: {e}") from e
        self._check_init()
        self.names = sorted(config.data.components)
        for name in self.names:
            kind = config.data.components[name].get("format", "")
            if kind not in FORMATS:
                raise ConfigError(
                    f"data.components.{name}.format={kind!r}; choose one of {', '.join(FORMATS)}"
                )

    def _check_init(self):
        """An imported tower must be the architecture the config describes, not only the same shapes
        (an activation, a norm epsilon or the pixel statistics a CLIP tower expects)."""
        # the VLM takes the ViT's patch tokens: its pooling and head do not apply
        vit_skip = {"pool", "final_norm", "num_classes", "head_zero_init", "dropout"}
        for entry, kind, what, mine, ignore in (
            ("llm", "llm", "an LLM", llm_kwargs(self.model.llm), {"vocab_size"}),
            ("vision", "vit", "a ViT", module_kwargs(self.model.vision), vit_skip),
        ):
            spec = self.config.init.get(entry)
            if not spec or not spec.get("path") or spec.get("into", entry) != entry:
                continue
            meta = weights.read_meta(spec.path)
            if meta.get("kind") != kind:
                continue
            wrong = {
                k: (v, mine[k])
                for k, v in meta["model"].items()
                if k in mine and k not in ignore and v != mine[k]
            }
            if wrong:
                raise ConfigError(
                    f"init.{entry}: {spec.path} is {what} with "
                    + ", ".join(f"{k}={v[0]!r}" for k, v in wrong.items())
                    + f" but model.{entry} has "
                    + ", ".join(f"{k}={v[1]!r}" for k, v in wrong.items())
                    + f"; set them in model.{entry} (e.g. --config.model.{entry}.{next(iter(wrong))}=...)"
                )

    # model
    def vit_size(self) -> int:
        s = self.config.data.image_size
        return s // 2 if self.config.model.subimages else s

    def init(self, rng):
        g = self.config.model.vision.posemb_size or self.vit_size()
        images = jnp.zeros((1, 1, g, g, 3), jnp.float32)  # the posemb grid is created at posemb_size
        tokens = jnp.zeros((1, 8), jnp.int32)
        return self.model.init(rng, tokens, images)

    def packing(self):
        L = self.config.model.seq_len
        return {
            "tokens": L,
            "targets": L,
            "loss_mask": L,
            "component": L,
            "images": self.config.model.image_slots,
        }

    def preprocess(self, component):
        comp = self.config.data.components[component]
        mc = self.config.model
        index = self.names.index(component)
        return Preprocess(
            self.fmt,
            comp.format,
            index,
            mc.seq_len,
            mc.image_slots,
            comp.get("turns", 1),
            comp.get("max_text_tokens", 0),
        )

    def loss(self, params, batch, ctx):
        seg = batch["tokens_segment_ids"]
        slots = batch.get("images_segment_ids")  # the packer's: 0 = an empty image slot
        hidden, aux = self.model.apply(
            {"params": params},
            batch["tokens"],
            to_float(batch["images"]),
            None if slots is None else slots > 0,
            positions=batch["tokens_positions"],
            segment_ids=seg,
            return_hidden=True,
        )
        mask = batch["loss_mask"] * (seg > 0)
        head = lambda h: self.model.apply({"params": params}, h, method=VLM.logits)  # noqa: E731
        chunk = self.config.model.get("loss_chunk", 0)
        text, ce = masked_chunked_cross_entropy(head, hidden, batch["targets"], mask, chunk)
        metrics = {"text_loss": text, "tokens": Sum(text.weight), "fill": Mean.of(seg > 0)}
        if slots is not None:  # the share of image slots holding an image (model.max_images)
            metrics["image_fill"] = Mean.of(slots > 0)
        for c, name in enumerate(self.names):
            m = mask * (batch["component"] == c)
            metrics[f"loss/{name}"] = Mean.of(ce, m)
            metrics[f"tokens/{name}"] = Sum(m.sum())
        loss = text
        if "moe_loss" in aux:  # a per-batch term: weighted like the tokens it was computed with
            loss = Mean(text.total + aux["moe_loss"] * text.weight, text.weight)
            metrics["moe_loss"] = aux["moe_loss"]
        return loss, metrics

    # evaluation and sampling
    def generate(self, params, tokens, mask, images, max_new_tokens: int, rng=None):
        """Continuations [B, max_new_tokens] of prompts with images spliced in (greedy; sampled at
        temperature 1 when `rng` is given)."""
        emb = self.model.apply({"params": params}, tokens, to_float(images), method=VLM.embed)
        ids, _ = decode.generate(
            self.model.llm,
            params["llm"],
            embeddings=emb,
            prompt_mask=mask,
            max_new_tokens=max_new_tokens,
            method="greedy" if rng is None else "sample",
            rng=rng,
            stop_tokens=(self.fmt.eos, self.fmt.image_id),
            pad_id=self.tokenizer.pad_token_id,
        )
        return ids

    def _piece(self, task):
        def piece(r, solved: bool):
            if task == "caption":
                return [self.fmt.image()] + ([self.fmt.text(r["text"], False)] if solved else [])
            q = [self.fmt.image(), self.fmt.text(qa_prompt(r["question"]), False)]
            return q + ([self.fmt.text(r["answer"], False)] if solved else [])

        return piece

    def evaluators(self):
        out, size = {}, self.config.data.image_size
        for name, spec in self.config.evals.items():
            task, k = spec.task, spec.shots
            prompt_len = (k + 1) * (self.fmt.per_image + 40) + 2
            view = "caption" if task == "caption" else "qa"
            few = FewShot(self.fmt, self._piece(task), view, k, prompt_len, size, pipeline.world_seed(spec))
            new = spec.get("max_new_tokens", 24)

            def step(params, batch, ctx, new=new):
                return {
                    "ids": self.generate(params, batch["tokens"], batch["mask"], batch["images"], new),
                    "index": batch["index"],
                }

            out[name] = Evaluator(
                spec, few, step, Score(self.tokenizer, task, spec.split, pipeline.world_seed(spec))
            )
        return out

    def sample(self, params, prompts, num_samples, ctx):
        """Answers (or, for an empty text, captions) about each prompt's image."""
        rows, size = [], self.config.data.image_size
        for p in prompts:
            if p.get("image") is None:
                raise ConfigError("MM1 answers questions about an image: give --image REF.png")
            image = np.asarray(p["image"], np.uint8)
            if image.shape[:2] != (size, size):
                raise ConfigError(
                    f"the image is {image.shape[1]}x{image.shape[0]} px; this model reads {size}x{size}"
                )
            pieces = [self.fmt.image()] + (
                [self.fmt.text(qa_prompt(p["text"]), False)] if p.get("text") else []
            )
            ids, _ = self.fmt.join(pieces, eos=False)
            tokens = np.repeat(ids[None], num_samples, 0)
            images = np.repeat(self.fmt.pictures([image])[None], num_samples, 0)
            rng = None if num_samples == 1 else jax.random.fold_in(ctx.rng, len(rows))
            out = self.generate(params, tokens, np.ones_like(tokens, bool), images, 24, rng)
            rows.append(
                [
                    {"text": t.strip()}
                    for t in self.tokenizer.batch_decode(np.asarray(out), skip_special_tokens=True)
                ]
            )
        return rows

    def exports(self):
        mc = self.config.model.to_dict()
        mc["llm"]["vocab_size"] = self.model.llm.vocab_size
        llm = {"kind": "llm", "model": llm_kwargs(self.model.llm)}
        spec = self.config.init.get("llm")
        base = weights.read_meta(spec.path) if spec and spec.get("path") else {}
        llm["hf_model_type"] = base.get("hf_model_type") or ("qwen2" if llm["model"]["qkv_bias"] else "llama")
        if base.get("hf_config"):
            llm["hf_config"] = base["hf_config"]
        return {
            "": Export("", {"kind": "vlm", "model": mc}, self.tokenizer),
            "llm": Export("llm", llm, self.tokenizer),
        }
