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

import functools
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mmjax.config import ConfigError
from mmjax.data import shapes, tokenizer as tok_lib
from mmjax.eval import shapes_eval
from mmjax.models import connectors
from mmjax.models.llm import LLM
from mmjax.models.vit import ViT
from mmjax.models.vlm import VLM
from mmjax.recipes.base import Evaluator, Recipe as BaseRecipe
from mmjax.sampling import decode
from mmjax.train import pretrained

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
    return shapes.scene_from_arrays(*(record[k] for k in ("num_objects", "obj_shape", "obj_color", "obj_size", "obj_box")))


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

    def text(self, s: str, train: bool):
        ids = self.tok.encode(s, add_special_tokens=False)
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
    """One component's record -> an example ready for packing."""

    def __init__(self, fmt: Formatter, kind: str, component: int, seq_len: int, image_slots: int, turns: int = 1):
        self.f, self.kind, self.component, self.turns = fmt, kind, component, turns
        self.seq_len, self.image_slots = seq_len, image_slots

    def __call__(self, record: dict) -> dict:
        f, images = self.f, []
        if self.kind in ("caption", "synthetic", "qa"):
            images = [record["image"]]
        elif self.kind == "interleaved":
            images = list(record["images"])
        if self.kind == "caption":
            pieces = [f.image(), f.text(record["text"], True)]
        elif self.kind == "synthetic":
            pieces = [f.image(), f.text(dense_caption(record), True)]
        elif self.kind == "interleaved":
            pieces = [p for text in record["texts"] for p in (f.image(), f.text(text, True))]
        elif self.kind == "text":
            pieces = [f.text(record["text"], True)]
        else:  # qa: a conversation about the image, the loss on the answers only
            pieces = [f.image()]
            for q, a in conversation(record, self.turns):  # each answer ends its turn with EOS
                pieces += [f.text(qa_prompt(q), False), f.text(a, True), ([f.eos], [True])]
        ids, flags = f.join(pieces, eos=self.kind != "qa")
        n, pics = len(ids) - 1, f.pictures(images)
        if n > self.seq_len or len(pics) > self.image_slots:
            raise ValueError(
                f"a {self.kind} example needs {n} tokens and {len(images)} images but rows hold "
                f"model.seq_len={self.seq_len} and model.image_slots={self.image_slots}; raise them"
            )
        return {
            "tokens": ids[:-1],
            "targets": ids[1:],
            "loss_mask": flags[1:].astype(np.float32),
            "component": np.full(n, self.component, np.int32),
            "images": pics,
        }


# ---- few-shot evaluation ----------------------------------------------------------------------
class FewShot:
    """A validation record -> a k-shot prompt (shots from the train split, fixed per record):
    captioning: `<image> caption` per shot, then `<image>`; VQA: `<image> Question: q Answer: a`
    per shot, then the query without its answer. Prompts are right-padded to `prompt_len`."""

    def __init__(self, fmt: Formatter, task: str, shots: int, prompt_len: int, image_size: int, seed: int):
        self.f, self.task, self.shots, self.prompt_len = fmt, task, shots, prompt_len
        self.view = "caption" if task == "caption" else "qa"
        self.pool = shapes.ShapesSource("train", self.view, image_size=image_size, seed=seed)

    def _piece(self, r, answer: bool):
        if self.task == "caption":
            return [self.f.image()] + ([self.f.text(r["text"], False)] if answer else [])
        q = [self.f.image(), self.f.text(qa_prompt(r["question"]), False)]
        return q + ([self.f.text(r["answer"], False)] if answer else [])

    def __call__(self, record: dict) -> dict:
        rng = np.random.default_rng((7, int(record["index"])))
        shots = [self.pool[int(j)] for j in rng.integers(0, len(self.pool), self.shots)]
        pieces = [p for r in shots for p in self._piece(r, True)] + self._piece(record, False)
        ids, _ = self.f.join(pieces, eos=False)
        if len(ids) > self.prompt_len:
            raise ValueError(f"{self.shots}-shot {self.task} prompt has {len(ids)} tokens > prompt_len {self.prompt_len}")
        tokens = np.zeros(self.prompt_len, np.int32)
        tokens[: len(ids)] = ids
        return {
            "tokens": tokens,
            "mask": np.arange(self.prompt_len) < len(ids),
            "images": self.f.pictures([r["image"] for r in shots] + [record["image"]]),
            "index": np.int32(record["index"]),
        }


_WORDS = re.compile(r"\b(" + "|".join((*shapes.COLORS, *shapes.SHAPES, *shapes.SIZES)) + r")s?\b")


def template(question: str) -> str:
    """A question with its attribute words blanked: the key of the answer prior."""
    return _WORDS.sub("_", question.lower())


@functools.lru_cache(maxsize=4)
def answer_prior(seed: int = 0, n: int = 4000) -> dict[str, str]:
    """The most common train answer per question template (what a model that ignores the image
    can do best): the chance level that VQA accuracy is compared with."""
    src, counts = shapes.ShapesSource("train", "qa", seed=seed), {}
    for i in range(n):
        r = src[i]
        by = counts.setdefault(template(r["question"]), {})
        a = shapes_eval.normalize_answer(r["answer"])
        by[a] = by.get(a, 0) + 1
    return {t: max(by, key=by.get) for t, by in counts.items()}


class Score:
    """Generated ids -> accuracy against the scorer (captions: every claim true of the scene;
    VQA: the exact answer), plus the image-blind answer prior for VQA, also per question kind."""

    def __init__(self, tokenizer, task: str, split: str, seed: int):
        self.tok, self.task, self.split, self.seed = tokenizer, task, split, seed

    def __call__(self, out: dict) -> dict:
        texts = self.tok.batch_decode(out["ids"], skip_special_tokens=True)
        if self.task == "caption":
            scenes = [shapes.scene(self.split, int(i), self.seed) for i in out["index"]]
            return {
                "accuracy": float(np.mean([shapes_eval.caption_correct(t, s) for t, s in zip(texts, scenes)])),
                "complete": float(
                    np.mean([shapes_eval.caption_correct(t, s, complete=True) for t, s in zip(texts, scenes)])
                ),
            }
        src, prior = shapes.ShapesSource(self.split, "qa", seed=self.seed), answer_prior(self.seed)
        rows = []  # (question kind, right, right by the prior)
        for text, i in zip(texts, out["index"]):
            q = src[int(i)]["question"]
            truth = shapes_eval.answer(shapes.scene(self.split, int(i), self.seed), q)
            rows.append((shapes_eval.question_kind(q), shapes_eval.normalize_answer(text) == truth,
                         prior.get(template(q)) == truth))
        result = {"accuracy": float(np.mean([r[1] for r in rows])), "prior": float(np.mean([r[2] for r in rows]))}
        for kind in sorted({r[0] for r in rows}):
            mine = [r for r in rows if r[0] == kind]
            result[f"accuracy/{kind}"] = float(np.mean([r[1] for r in mine]))
            result[f"prior/{kind}"] = float(np.mean([r[2] for r in mine]))
        return result


# ---- the recipe -------------------------------------------------------------------------------
def build_model(mc, vocab_size: int, image_token_id: int) -> VLM:
    dtype = jnp.dtype(mc.dtype)
    common = dict(dtype=dtype, scan=mc.scan, remat=mc.remat)
    vision = {k: v for k, v in mc.vision.items() if k != "posemb_size"}
    llm = {k: v for k, v in mc.llm.items() if k != "vocab_size"}
    moe = llm.pop("moe", None)
    if moe and moe.get("num_experts"):
        llm["moe"] = dict(moe)
    conn = dict(mc.connector)
    kind = conn.pop("kind")
    try:
        return VLM(
            vision=ViT(**vision, pool="none", **common),
            connector=connectors.build(kind, out_dim=llm["width"], dtype=dtype, **conn),
            llm=LLM(vocab_size=vocab_size, **llm, **common),
            image_token_id=image_token_id,
        )
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model config: {e}") from e


def load_pretrained(path: str) -> tuple[VLM, dict, object]:
    """(model, params, tokenizer) from the weights folder `mmjax export` writes for an MM1 run:
    how another recipe (IOMM's frozen MLLM) loads a trained MM1 by path."""
    params, meta = pretrained.load(path)
    if meta.get("kind") != "mm1":
        raise ConfigError(f"{path} holds {meta.get('kind')!r} weights, not an MM1 export (`mmjax export`)")
    mc = ml_collections.ConfigDict(meta["model"])
    tokenizer = tok_lib.load(mc.tokenizer or None)
    model = build_model(mc, mc.llm.vocab_size or len(tokenizer), tokenizer.convert_tokens_to_ids(tok_lib.IMAGE))
    return model, params, tokenizer


class Recipe(BaseRecipe):
    def __init__(self, config):
        super().__init__(config)
        mc = config.model
        self.tokenizer = tok_lib.load(mc.tokenizer or None)
        self.fmt = Formatter(self.tokenizer, mc.connector.num_tokens, mc.subimages, self.vit_size())
        vocab = mc.llm.get("vocab_size") or len(self.tokenizer)
        if vocab < len(self.tokenizer):
            raise ConfigError(f"model.llm.vocab_size={vocab} < the tokenizer's {len(self.tokenizer)} tokens")
        self.model = build_model(mc, vocab, self.fmt.image_id)
        self.names = sorted(config.data.components)
        for name in self.names:
            kind = config.data.components[name].get("format", "")
            if kind not in FORMATS:
                raise ConfigError(f"data.components.{name}.format={kind!r}; choose one of {', '.join(FORMATS)}")

    # model
    def vit_size(self) -> int:
        s = self.config.data.image_size
        return s // 2 if self.config.model.subimages else s

    def init(self, rng):
        g = self.config.model.vision.posemb_size or self.vit_size()
        images = jnp.zeros((1, 1, g, g, 3), jnp.float32)  # the posemb grid is created at posemb_size
        tokens = jnp.zeros((1, 8), jnp.int32)
        return self.model.init(rng, tokens, images)["params"]

    def packing(self):
        L = self.config.model.seq_len
        return {"tokens": L, "targets": L, "loss_mask": L, "component": L, "images": self.config.model.image_slots}

    def preprocess(self, component):
        comp = self.config.data.components[component]
        mc = self.config.model
        index = self.names.index(component)
        return Preprocess(self.fmt, comp.format, index, mc.seq_len, mc.image_slots, comp.get("turns", 1))

    def loss(self, params, batch, rng):
        seg = batch["tokens_segment_ids"]
        logits, aux = self.model.apply(
            {"params": params},
            batch["tokens"],
            to_float(batch["images"]),
            positions=batch["tokens_positions"],
            segment_ids=seg,
        )
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        mask = batch["loss_mask"] * (seg > 0)
        loss = (ce * mask).sum() / jnp.maximum(mask.sum(), 1.0)
        metrics = {"text_loss": loss, "tokens": mask.sum(), "fill": (seg > 0).mean()}
        for c, name in enumerate(self.names):
            m = mask * (batch["component"] == c)
            metrics[f"loss/{name}"] = (ce * m).sum() / jnp.maximum(m.sum(), 1.0)
            metrics[f"tokens/{name}"] = m.sum()
        if "moe_loss" in aux:
            loss = loss + aux["moe_loss"]
            metrics["moe_loss"] = aux["moe_loss"]
        return loss, metrics

    # evaluation
    def generate(self, params, tokens, mask, images, max_new_tokens: int):
        """Greedy continuations [B, max_new_tokens] of prompts with images spliced in."""
        emb = self.model.apply({"params": params}, tokens, to_float(images), method=VLM.embed)
        ids, _ = decode.generate(
            self.model.llm,
            params["llm"],
            embeddings=emb,
            prompt_mask=mask,
            max_new_tokens=max_new_tokens,
            stop_tokens=(self.fmt.eos, self.fmt.image_id),
            pad_id=self.tokenizer.pad_token_id,
        )
        return ids

    def evaluators(self):
        out, size = {}, self.config.data.image_size
        for name, spec in self.config.evals.items():
            task, k = spec.task, spec.shots
            prompt_len = (k + 1) * (self.fmt.per_image + 40) + 2
            few = FewShot(self.fmt, task, k, prompt_len, size, self.config.seed)
            new = spec.get("max_new_tokens", 24)

            def step(params, batch, new=new):
                return {"ids": self.generate(params, batch["tokens"], batch["mask"], batch["images"], new),
                        "index": batch["index"]}

            out[name] = Evaluator(spec, few, step, Score(self.tokenizer, task, spec.split, self.config.seed))
        return out
