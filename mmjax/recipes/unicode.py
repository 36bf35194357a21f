"""UniCode (arXiv 2403.09072): a VQ tokenizer whose codes are LLM token ids (mmjax/models/unicode.py),
then the LLM trained over unified sequences of words and codes.

`model.stage` 1, the tokenizer, by `model.codebook.mode`:
- 'language' (language-driven): the codebook follows k-means EMA statistics of the encoder's
  features, summed over the global batch (`loss` returns them, `update_state` folds them in),
  each code rescaled to its LLM row's norm and blended toward that row, C = (1 - a) C_ema + a C_llm,
  a ramping 0 -> 1 over `codebook.ramp` (fractions of train.steps) and held at 1. Dead codes
  restart (quantization.restart_dead). The LLM is never trained, its table never written.
- 'frozen': the codebook is the LLM's rows; the encoder learns to meet them.
- 'dual' (dual alternating): the codebook is the LLM's rows, and both write them: even steps train
  the tokenizer with a codebook loss ||sg(z) - q||^2 into the table, odd steps the LLM on the
  components' captions (language modelling); one optimizer, so its moments carry across. Only the
  step's half computes (on a CPU both run and the parity picks one); `llm_step` says which, the
  other half's metrics read 0.
Loss: mean squared reconstruction error + beta x commitment (beta 0.25) (+ the codebook loss).

`model.stage` 2: the tokenizer, codebook and code map frozen; the LLM (and the connector, which
reads an image's aggregated h x w embeddings) trained on each component's task (`format`):
  caption     [BOS] <h*w image embeddings> caption [EOS]
  vqa         [BOS] <h*w image embeddings> Question: q Answer: a [EOS]
  t2i         [BOS] caption <image> <h*w*D code tokens>         (the LLM writes the image)
  decompress  [BOS] <h*w image embeddings> <image> <h*w*D code tokens>  (in-context decompression)
the loss on the answer, caption or code tokens. Code tokens are the frozen tokenizer's codes of the
example's image mapped to token ids in the step; a generated code sequence maps back and decodes.

Examples: `images` [S, S, 3] uint8, and (stage 2, dual mode) the row `ids`, `slot` (0 token,
1 image embedding, 2 code), `train` (the position is a target), `mask`, all [seq_len + 1].
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.config import ConfigError
from mmjax.data import pipeline, tokenizer as tok_lib
from mmjax.eval import artefacts, captioning, shapes_eval, vqa
from mmjax.models import llm as llm_lib, unicode, vq
from mmjax.objectives import quantization as Q
from mmjax.objectives.cross_entropy import masked_chunked_cross_entropy
from mmjax.objectives import reduce
from mmjax.objectives.reduce import Mean
from mmjax.recipes.base import Evaluator, Export, Recipe as BaseRecipe
from mmjax.sampling import decode

MODES = ("language", "frozen", "dual")
FORMATS = {1: ("image", "caption"), 2: ("caption", "vqa", "t2i", "decompress")}
TOKEN, EMBEDDING, CODE = 0, 1, 2  # slot kinds
EVALS = ("reconstruct", "vqa", "caption", "t2i")


def to_float(images):
    return images.astype(jnp.float32) / 127.5 - 1.0


def to_uint8(x):
    return jnp.clip((x + 1) * 127.5, 0, 255).astype(jnp.uint8)


def psnr(x, y):
    """Per-image PSNR (dB) of float images in [-1, 1]: peak-to-peak 2."""
    mse = jnp.mean((jnp.clip(x, -1, 1) - y) ** 2, (1, 2, 3))
    return 10 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10))


def qa_prompt(question: str) -> str:
    return f"Question: {question} Answer:"


def _table(params):
    return params["llm"]["embedder"]["embedding"]


def _gather(values, slot, kind):
    """values [B, n, ...] placed at the positions of `slot` == kind, in order (clipped elsewhere)."""
    idx = jnp.clip(jnp.cumsum(slot == kind, 1) - 1, 0, values.shape[1] - 1)
    return jnp.take_along_axis(values, idx.reshape(*idx.shape, *(1,) * (values.ndim - 2)), 1)


class Rows:
    """Unified sequences from pieces (ids, slots, train flags) as fixed-length arrays. Picklable."""

    def __init__(self, tokenizer, positions: int, codes: int, length: int):
        self.tok, self.positions, self.codes, self.length = tokenizer, positions, codes, length
        self.bos, self.eos, self.pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
        self.boi = tokenizer.convert_tokens_to_ids(tok_lib.IMAGE)

    def text(self, s: str, train: bool = False):
        ids = self.tok.encode(s, add_special_tokens=False)
        return ids, [TOKEN] * len(ids), [train] * len(ids)

    def end(self):
        return [self.eos], [TOKEN], [True]

    def image(self):
        """The image's h x w aggregated embeddings (through the connector)."""
        return [self.pad] * self.positions, [EMBEDDING] * self.positions, [False] * self.positions

    def code_map(self, train: bool = True):
        """<image> and its h*w*D code tokens (`train`: the targets), or <image> alone (a prompt)."""
        n = self.codes if train else 0
        return [self.boi] + [self.pad] * n, [TOKEN] + [CODE] * n, [False] + [True] * n

    def join(self, pieces, length: int = 0) -> dict | None:
        """[BOS] + pieces, right-padded to `length` (self.length + 1 by default); None if longer."""
        ids, slot, train = [self.bos], [TOKEN], [False]
        for i, s, t in pieces:
            ids, slot, train = ids + list(i), slot + list(s), train + list(t)
        length = length or self.length + 1
        if len(ids) > length:
            return None
        pad = length - len(ids)
        return {
            "ids": np.asarray(ids + [self.pad] * pad, np.int32),
            "slot": np.asarray(slot + [TOKEN] * pad, np.int8),
            "train": np.asarray(train + [False] * pad, bool),
            "mask": np.arange(length) < len(ids),
        }


class Preprocess:
    """A record -> a training example of `task` (a component's format; 'image': images only)."""

    def __init__(self, rows: Rows, task: str):
        self.rows, self.task = rows, task

    def pieces(self, record: dict):
        r = self.rows
        if self.task == "caption":
            return [r.image(), r.text(record["text"], True), r.end()]
        if self.task == "vqa":
            return [r.image(), r.text(qa_prompt(record["question"])), r.text(record["answer"], True), r.end()]
        if self.task == "t2i":
            return [r.text(record["text"]), r.code_map()]
        if self.task == "decompress":
            return [r.image(), r.code_map()]
        return [r.text(record["text"], True), r.end()]  # 'text': stage 1's dual LM steps

    def __call__(self, record: dict) -> dict:
        out = {"images": np.asarray(record["image"], np.uint8)}
        if self.task != "image":
            row = self.rows.join(self.pieces(record))
            if row is None:
                return {"index": record["index"], "_skip": "more tokens than model.seq_len"}
            out.update(row)
        return out


class Prompt:
    """An evaluation or sampling record -> a right-padded prompt row (+ the image it is about)."""

    def __init__(self, rows: Rows, task: str, length: int):
        self.rows, self.task, self.length = rows, task, length

    def __call__(self, record: dict) -> dict:
        r = self.rows
        if self.task == "t2i":
            pieces = [r.text(record["text"]), r.code_map(train=False)]
        elif self.task == "vqa":
            pieces = [r.image(), r.text(qa_prompt(record["question"]))]
        else:  # caption; reconstruct reads only the image
            pieces = [r.image()]
        row = r.join(pieces, self.length)
        if row is None:
            text = record.get("question") or record.get("text", "")
            raise ConfigError(
                f"a {self.task} prompt ({text!r}) is longer than {self.length} tokens; "
                "raise model.sample.prompt_tokens"
            )
        out = {**row, "index": np.int32(record.get("index", 0))}
        if "image" in record:
            out["images"] = np.asarray(record["image"], np.uint8)
        return out


class Recipe(BaseRecipe):
    def __init__(self, config):
        super().__init__(config)
        mc, cb = config.model, config.model.codebook
        if mc.stage not in FORMATS:
            raise ConfigError(f"model.stage={mc.stage!r}; 1 (the tokenizer) or 2 (the LLM)")
        if cb.mode not in MODES:
            raise ConfigError(f"model.codebook.mode={cb.mode!r}; choose from {', '.join(MODES)}")
        self.tokenizer = tok_lib.load(mc.tokenizer or None)
        tok_lib.add_special_tokens(self.tokenizer, (tok_lib.IMAGE,))
        self.specials = tuple(sorted(set(self.tokenizer.all_special_ids)))
        try:
            llm = llm_lib.LLM(**{**mc.llm.to_dict(), "dtype": mc.dtype})
            tok = vq.VQTokenizer(code_width=llm.width, dtype=mc.dtype, **mc.vq.to_dict())
            self.model = unicode.UniCode(tok, llm, mc.num_codes)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model config: {e}") from e
        S, f = config.data.image_size, tok.downsample_factor
        if S % f:
            raise ConfigError(f"data.image_size={S} is not a multiple of the tokenizer's downsampling ({f})")
        if mc.num_codes > llm.vocab_size - len(self.specials):
            raise ConfigError(
                f"model.num_codes={mc.num_codes} > the LLM's {llm.vocab_size} tokens less "
                f"{len(self.specials)} special ones; lower it or raise model.llm.vocab_size"
            )
        self.grid = (S // f, S // f, tok.depth)  # h, w, D
        self.rows = Rows(self.tokenizer, self.grid[0] * self.grid[1], int(np.prod(self.grid)), mc.seq_len)
        self.names = sorted(config.data.components)
        for name in self.names:
            fmt = config.data.components[name].get("format", "image")
            if fmt not in FORMATS[mc.stage] or (self.dual and fmt != "caption"):
                allowed = ("caption",) if self.dual else FORMATS[mc.stage]
                raise ConfigError(
                    f"data.components.{name}.format={fmt!r}; stage {mc.stage}"
                    + (" in dual mode (its LLM steps read the captions)" if self.dual else "")
                    + f" takes {', '.join(allowed)}"
                )
        if (mc.stage == 2 or self.dual) and llm.vocab_size < len(self.tokenizer):
            raise ConfigError(
                f"model.llm.vocab_size={llm.vocab_size} < the tokenizer's {len(self.tokenizer)}"
            )

    @property
    def dual(self) -> bool:
        return self.config.model.stage == 1 and self.config.model.codebook.mode == "dual"

    @property
    def ema(self) -> bool:
        return self.config.model.stage == 1 and self.config.model.codebook.mode == "language"

    def init(self, rng):
        S = self.config.data.image_size
        variables = self.model.init(rng, jnp.zeros((1, S, S, 3)), jnp.zeros((1, 2), jnp.int32))
        if self.ema:  # vector-quantize-pytorch's initial buffers
            K = self.config.model.num_codes
            variables["stats"] = {
                "cluster_size": nn.LogicallyPartitioned(jnp.ones((K,), jnp.float32), (None,)),
                "embed_sum": variables["params"]["codebook"],  # cluster size 1: the initial codes
            }
        return variables

    def preprocess(self, component):
        fmt = self.config.data.components[component].get("format", "image")
        return Preprocess(
            self.rows, "text" if self.dual else ("image" if self.config.model.stage == 1 else fmt)
        )

    def fixed_params(self):
        if self.config.model.stage == 2:
            return ("^vq/", "^codebook$", "^token_ids$")
        return ("^codebook$", "^token_ids$", "^connector/") + (() if self.dual else ("^llm/",))

    # ---- the codebook --------------------------------------------------------------------------
    def token_ids(self, params):
        """The code -> token-id map: fixed at the first step from the (loaded) LLM table."""
        ids = params["token_ids"]
        fix = lambda: unicode.code_token_ids(_table(params), self.config.model.num_codes, self.specials)  # noqa: E731
        return jax.lax.cond(ids[0] < 0, fix, lambda: ids)  # the top-k only until the map is set

    def llm_rows(self, params):
        return jax.lax.stop_gradient(_table(params)[self.token_ids(params)])

    def codebook(self, params):
        """The tokenizer's codebook: stage 1 frozen, the LLM rows; dual, the rows with their gradient;
        else the recipe-written parameter."""
        mode = self.config.model.codebook.mode
        if self.config.model.stage == 1 and mode == "frozen":
            return self.llm_rows(params)
        if self.dual:
            return _table(params)[self.token_ids(params)]
        return jax.lax.stop_gradient(params["codebook"])

    def _apply(self, params, method, *args):
        return self.model.apply({"params": params}, *args, method=method)

    def tokenize(self, params, images):
        """(aggregated, codes, layer inputs, layer codes) of uint8 images."""
        z = self._apply(params, lambda m, x: m.vq.features(x), to_float(images))
        return self.model.vq.quantize(z, self.codebook(params), self.config.model.codebook.chunk)

    def decode(self, params, aggregated):
        return self._apply(params, lambda m, a: m.vq.decode(a), aggregated)

    def render(self, params, codes):
        """Code indices [B, h, w, D] -> uint8 images."""
        agg = self._apply(params, lambda m, c, cb: m.vq.embed_codes(c, cb), codes, self.codebook(params))
        return to_uint8(self.decode(params, agg))

    # ---- unified sequences ---------------------------------------------------------------------
    def sequence(self, params, batch):
        """(input embeddings [B, L, E], token ids [B, L]) of rows: code slots filled with the frozen
        tokenizer's code tokens of the row's image, embedding slots with the connector's view of it."""
        ids, slot = batch["ids"], batch["slot"]
        if "images" not in batch:
            return self._apply(params, unicode.UniCode.embed, ids), ids
        agg, codes, _, _ = self.tokenize(params, batch["images"])
        agg = jax.lax.stop_gradient(agg)
        code_ids = params["token_ids"][codes.reshape(codes.shape[0], -1)]
        ids = jnp.where(slot == CODE, _gather(code_ids, slot, CODE), ids)
        emb = self._apply(params, unicode.UniCode.embed, ids)
        image = self._apply(params, unicode.UniCode.image_inputs, agg).astype(emb.dtype)
        return jnp.where((slot == EMBEDDING)[..., None], _gather(image, slot, EMBEDDING), emb), ids

    def lm_loss(self, params, batch):
        emb, ids = self.sequence(params, batch)
        mask = batch["mask"]
        hidden = self._apply(params, unicode.UniCode.lm, emb[:, :-1], mask[:, :-1], True)
        weight = batch["train"][:, 1:] & mask[:, 1:]
        head = lambda h: self._apply(params, unicode.UniCode.logits, h)  # noqa: E731
        chunk = self.config.model.get("loss_chunk", 0)
        loss, ce = masked_chunked_cross_entropy(head, hidden, ids[:, 1:], weight, chunk)
        metrics = {"text_loss": loss}
        if self.config.model.stage == 2:
            for c, name in enumerate(self.names):
                metrics[f"loss/{name}"] = Mean.of(ce, weight & (batch["_component"] == c)[:, None])
        return loss, metrics

    # ---- training ------------------------------------------------------------------------------
    def loss(self, params, batch, ctx):
        if self.config.model.stage == 2:
            return self.lm_loss(params, batch)
        if not self.dual:
            return self.tokenizer_loss(params, batch, ctx)
        # dual: only the step's own half runs (lax.cond); the other half's metrics read 0
        halves = [lambda: self.tokenizer_loss(params, batch, ctx), lambda: self.lm_loss(params, batch)]
        shapes = [jax.eval_shape(lambda f=f: reduce.additive(f()[1])) for f in halves]
        empty = {k: v for shape in shapes for k, v in shape.items()}
        empty = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), empty)

        def run(i):
            loss, metrics = halves[i]()
            return loss, {**empty, **reduce.additive(metrics), "llm_step": jnp.float32(i)}

        even = ctx.step % 2 == 0
        if jax.default_backend() != "cpu":
            return jax.lax.cond(even, lambda: run(0), lambda: run(1))
        # XLA:CPU runs a convolution inside a conditional's branch on a slow path (its gradient 43x
        # slower, BENCHMARKS.md section 16): there both halves run and the parity picks one, which
        # gives the same updates (the other half's gradient is zero) and the same metrics
        return jax.tree.map(lambda a, b: jnp.where(even, a, b), run(0), run(1))

    def tokenizer_loss(self, params, batch, ctx):
        """Reconstruction + commitment (+ the dual mode's codebook loss into the table); the
        language mode's EMA statistics as the step's stats."""
        cb = self.config.model.codebook
        x = to_float(batch["images"])
        agg, codes, inputs, q = self.tokenize(params, batch["images"])
        recon = self.decode(params, agg)
        err = jnp.mean((recon - x) ** 2, (1, 2, 3))
        commit = Q.commitment_loss(inputs, q, cb.beta)
        counts, sums = Q.ema_stats(
            inputs.reshape(-1, inputs.shape[-1]), codes.reshape(-1), self.config.model.num_codes
        )
        metrics = {
            "recon_mse": Mean.of(err),
            "psnr": Mean.of(psnr(recon, x)),
            "commitment": commit,
            **Q.code_stats(counts),
        }
        if self.ema:
            metrics["alpha"] = self.alpha(ctx.step)
            return Mean.of(err + commit), metrics, {"counts": counts, "sums": sums}
        if self.dual:
            metrics["codebook_loss"] = jnp.mean((jax.lax.stop_gradient(inputs) - q) ** 2)
            return Mean.of(err + commit + metrics["codebook_loss"]), metrics
        return Mean.of(err + commit), metrics

    def alpha(self, step):
        start, end = self.config.model.codebook.ramp
        n = self.config.train.steps
        return Q.ramp(step, int(start * n), int(end * n))

    def update_state(self, state, stats, ctx):
        cb, s = self.config.model.codebook, state["stats"]
        size, total, _ = Q.ema_update(
            s["cluster_size"], s["embed_sum"], stats["counts"], stats["sums"], cb.decay, cb.eps
        )
        if cb.dead_threshold > 0:
            size, total = Q.restart_dead(size, total, jax.random.fold_in(ctx.rng, 7), cb.dead_threshold)
        return {**state, "stats": {"cluster_size": size, "embed_sum": total}}

    def constrain(self, params, ctx):
        ids = self.token_ids(params)
        if self.config.model.stage == 2:
            return {**params, "token_ids": ids}
        rows = _table(params)[ids]
        if self.ema:
            cb, s = self.config.model.codebook, ctx.state["stats"]
            c_ema = Q.ema_codebook(s["cluster_size"], s["embed_sum"], cb.eps)  # after the restarts
            rows = Q.blend(Q.rescale_to(c_ema, rows), rows, self.alpha(ctx.step + 1))
        return {**params, "codebook": rows.astype(params["codebook"].dtype), "token_ids": ids}

    # ---- generation ----------------------------------------------------------------------------
    def write_text(self, params, batch, max_new_tokens: int, rng=None):
        """Continuations [B, max_new_tokens] of prompt rows (greedy; sampled when `rng` is given)."""
        emb, _ = self.sequence(params, batch)
        ids, _ = decode.generate(
            self.model.llm,
            params["llm"],
            embeddings=emb,
            prompt_mask=batch["mask"],
            max_new_tokens=max_new_tokens,
            method="greedy" if rng is None else "sample",
            rng=rng,
            stop_tokens=(self.rows.eos,),
            pad_id=self.rows.pad,
        )
        return ids

    def draw(self, params, batch, rng):
        """Images uint8 [B, S, S, 3] from t2i prompt rows: the LLM writes h*w*D code tokens (only code
        tokens allowed, sampled at model.sample's temperature and top-k), mapped back to codes."""
        sc, V = self.config.model.sample, self.model.llm.vocab_size
        emb, _ = self.sequence(params, batch)
        ids = params["token_ids"]
        out, _ = decode.generate(
            self.model.llm,
            params["llm"],
            embeddings=emb,
            prompt_mask=batch["mask"],
            max_new_tokens=self.rows.codes,
            method="sample",
            rng=rng,
            temperature=sc.temperature,
            top_k=sc.top_k,
            pad_id=self.rows.pad,
            allowed=jnp.zeros(V, bool).at[ids].set(True),
        )
        inverse = jnp.zeros(V, jnp.int32).at[ids].set(jnp.arange(ids.shape[0], dtype=jnp.int32))
        return self.render(params, inverse[out].reshape(out.shape[0], *self.grid))

    def prompt_length(self, task: str) -> int:
        return (self.rows.positions if task != "t2i" else 0) + self.config.model.sample.prompt_tokens

    def sample(self, params, prompts, num_samples, ctx):
        """An image for a prompt without one; for a prompt with an image, the answer to its text (a
        question) or, for no text, a caption."""
        S, jobs = self.config.data.image_size, []
        for i, p in enumerate(prompts):  # validate everything before anything compiles
            image = p.get("image")
            if image is not None and np.asarray(image).shape[:2] != (S, S):
                raise ConfigError(
                    f"the image is {image.shape[1]}x{image.shape[0]} px; this model reads {S}x{S}"
                )
            task = "t2i" if image is None else ("vqa" if p.get("text") else "caption")
            record = {"index": i, "text": p.get("text", ""), "question": p.get("text", "")}
            if image is not None:
                record["image"] = np.asarray(image, np.uint8)
            jobs.append((task, Prompt(self.rows, task, self.prompt_length(task))(record)))
        if not hasattr(self, "_samplers"):
            self._samplers = {
                "t2i": jax.jit(self.draw),
                "text": jax.jit(
                    lambda p, b, r: self.write_text(p, b, self.config.model.sample.max_text_tokens, r)
                ),
            }
        rows = []
        for i, (task, row) in enumerate(jobs):
            batch = {k: np.repeat(v[None], num_samples, 0) for k, v in row.items() if k != "index"}
            rng = jax.random.fold_in(ctx.rng, i)
            if task == "t2i":
                rows.append([{"image": im} for im in np.asarray(self._samplers["t2i"](params, batch, rng))])
            else:
                ids = np.asarray(self._samplers["text"](params, batch, rng if num_samples > 1 else None))
                texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
                rows.append([{"text": t.strip()} for t in texts])
        return rows

    # ---- evaluation ----------------------------------------------------------------------------
    def evaluators(self):
        out = {}
        for name, spec in self.config.evals.items():
            if spec.task not in EVALS:
                raise ConfigError(f"evals.{name}.task={spec.task!r}; choose from {', '.join(EVALS)}")
            pre = Prompt(self.rows, spec.task, self.prompt_length(spec.task))
            if spec.task == "reconstruct":
                out[name] = Evaluator(spec, pre, self._reconstruct, self._reconstruction)
            elif spec.task == "t2i":
                step = lambda p, b, ctx: {"image": self.draw(p, b, ctx.rng), "index": b["index"]}  # noqa: E731
                out[name] = Evaluator(spec, pre, step, shapes_eval.GenEval(spec))
            else:
                n = spec.get("max_new_tokens", self.config.model.sample.max_text_tokens)
                step = lambda p, b, ctx, n=n: {"ids": self.write_text(p, b, n), "index": b["index"]}  # noqa: E731
                out[name] = Evaluator(spec, pre, step, TextScore(self.tokenizer, spec))
        return out

    def _reconstruct(self, params, batch, ctx):
        agg, codes, _, _ = self.tokenize(params, batch["images"])
        recon = self.decode(params, agg)
        unit = lambda a: Q.rescale_to(a, jnp.ones_like(a[:, :1]))  # noqa: E731
        cos = jnp.sum(unit(self.codebook(params)) * unit(self.llm_rows(params)), -1).mean()
        return {
            "psnr": psnr(recon, to_float(batch["images"])),
            "codes": codes.reshape(codes.shape[0], -1),
            "image": batch["images"],
            "recon": to_uint8(recon),
            "cosine": jnp.full((codes.shape[0],), cos),
        }

    def _reconstruction(self, out):
        counts = np.bincount(np.asarray(out["codes"]).reshape(-1), minlength=self.config.model.num_codes)
        stats = {k: float(v) for k, v in Q.code_stats(jnp.asarray(counts, jnp.float32)).items()}
        n = min(len(out["image"]), 16)
        pairs = [im for pair in zip(out["image"][:n], out["recon"][:n]) for im in pair]
        return {
            "psnr": float(np.mean(out["psnr"])),
            **stats,
            "codebook_llm_cosine": float(np.mean(out["cosine"])),
            "grid": artefacts.Images(np.stack(pairs), tuple(["image", "reconstruction"] * n), columns=8),
        }

    def exports(self):
        meta = {"kind": "unicode", "model": self.config.model.to_dict(), "code_grid": list(self.grid)}
        return {"": Export("", meta, self.tokenizer)}


class TextScore:
    """Generated ids -> the shapes world's scorer: VQA accuracy and the image-blind answer prior, or
    caption accuracy (every claim true of the scene), with the texts as rows."""

    def __init__(self, tokenizer, spec):
        self.tok, self.task, self.split, self.seed = (
            tokenizer,
            spec.task,
            spec.split,
            pipeline.world_seed(spec),
        )

    def __call__(self, out: dict) -> dict:
        texts = self.tok.batch_decode(out["ids"], skip_special_tokens=True)
        scorer = vqa.score if self.task == "vqa" else captioning.score
        result = scorer(texts, out["index"], self.split, self.seed)
        result["texts"] = artefacts.Texts(
            tuple({"index": int(i), "output": t} for i, t in zip(out["index"], texts))
        )
        return result
