"""UniCode (arXiv 2403.09072) stage 1: the VQ tokenizer trained to reconstruct images with a
codebook whose codes are LLM token ids (mmjax/models/unicode.py).

`model.codebook.mode`:
- 'language' (language-driven): the codebook follows k-means EMA statistics of the encoder's
  features, summed over the global batch (`loss` returns them, `update_state` folds them in),
  each code rescaled to its LLM row's norm and blended toward that row, C = (1 - a) C_ema + a C_llm,
  a ramping 0 -> 1 over `codebook.ramp` (fractions of train.steps) and held at 1. Dead codes
  restart (quantization.restart_dead). The LLM's table is never written.
- 'frozen': the codebook is the LLM's rows; the encoder learns to meet them.
Loss: mean squared reconstruction error + beta x commitment (beta 0.25).

Examples: `images` [S, S, 3] uint8 (any view with images).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.config import ConfigError
from mmjax.eval import artefacts
from mmjax.models import llm as llm_lib, unicode, vq
from mmjax.objectives import quantization as Q
from mmjax.objectives.reduce import Mean
from mmjax.recipes.base import Evaluator, Recipe as BaseRecipe

MODES = ("language", "frozen")


def to_float(images):
    return images.astype(jnp.float32) / 127.5 - 1.0


def psnr(x, y):
    """Per-image PSNR (dB) of float images in [-1, 1]: peak-to-peak 2."""
    mse = jnp.mean((jnp.clip(x, -1, 1) - y) ** 2, (1, 2, 3))
    return 10 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10))


def _table(params):
    return params["llm"]["embedder"]["embedding"]


def preprocess(record: dict) -> dict:
    out = {"images": np.asarray(record["image"], np.uint8)}
    if "index" in record:
        out["index"] = np.int64(record["index"])
    return out


class Recipe(BaseRecipe):
    def __init__(self, config):
        super().__init__(config)
        mc, cb = config.model, config.model.codebook
        if cb.mode not in MODES:
            raise ConfigError(f"model.codebook.mode={cb.mode!r}; choose from {', '.join(MODES)}")
        try:
            llm = llm_lib.LLM(**{**mc.llm.to_dict(), "dtype": mc.dtype})
            tok = vq.VQTokenizer(code_width=llm.width, **mc.vq.to_dict())
            self.model = unicode.UniCode(tok, llm, mc.num_codes)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model config: {e}") from e
        if config.data.image_size % tok.downsample_factor:
            raise ConfigError(
                f"data.image_size={config.data.image_size} is not a multiple of the tokenizer's "
                f"downsampling ({tok.downsample_factor})"
            )

    def init(self, rng):
        S = self.config.data.image_size
        variables = self.model.init(rng, jnp.zeros((1, S, S, 3)), jnp.zeros((1, 2), jnp.int32))
        if self.config.model.codebook.mode == "language":  # vector-quantize-pytorch's initial buffers
            K = self.config.model.num_codes
            variables["stats"] = {
                "cluster_size": nn.LogicallyPartitioned(jnp.ones((K,), jnp.float32), (None,)),
                "embed_sum": variables["params"]["codebook"],  # cluster size 1: the initial codes
            }
        return variables

    def preprocess(self, component):
        return preprocess

    def fixed_params(self):
        return ("^codebook$", "^token_ids$")

    # ---- the codebook --------------------------------------------------------------------------
    def token_ids(self, params):
        """The code -> token-id map: fixed at the first step from the (loaded) LLM table."""
        ids = params["token_ids"]
        fix = lambda: unicode.code_token_ids(_table(params), self.config.model.num_codes)  # noqa: E731
        return jax.lax.cond(ids[0] < 0, fix, lambda: ids)  # the top-k only until the map is set

    def llm_rows(self, params):
        return jax.lax.stop_gradient(_table(params)[self.token_ids(params)])

    def codebook(self, params):
        if self.config.model.codebook.mode == "frozen":
            return self.llm_rows(params)
        return jax.lax.stop_gradient(params["codebook"])

    def _apply(self, params, method, *args):
        return self.model.apply({"params": params}, *args, method=method)

    def tokenize(self, params, images):
        """(aggregated, codes, layer inputs, layer codes) of uint8 images."""
        z = self._apply(params, lambda m, x: m.vq.features(x), to_float(images))
        return self.model.vq.quantize(z, self.codebook(params), self.config.model.codebook.chunk)

    def decode(self, params, aggregated):
        return self._apply(params, lambda m, a: m.vq.decode(a), aggregated)

    # ---- training ------------------------------------------------------------------------------
    def loss(self, params, batch, ctx):
        cb = self.config.model.codebook
        x = to_float(batch["images"])
        agg, codes, inputs, q = self.tokenize(params, batch["images"])
        recon = self.decode(params, agg)
        err = jnp.mean((recon - x) ** 2, (1, 2, 3))
        commit = Q.commitment_loss(inputs, q, cb.beta)
        counts, sums = Q.ema_stats(
            inputs.reshape(-1, inputs.shape[-1]), codes.reshape(-1), self.config.model.num_codes
        )
        stats = Q.code_stats(counts)
        metrics = {
            "recon_mse": Mean.of(err),
            "psnr": Mean.of(psnr(recon, x)),
            "commitment": commit,
            **stats,
            "alpha": self.alpha(ctx.step),
        }
        out = (Mean.of(err + commit), metrics)
        return (*out, {"counts": counts, "sums": sums}) if cb.mode == "language" else out

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
        cb = self.config.model.codebook
        ids = self.token_ids(params)
        rows = _table(params)[ids]
        if cb.mode == "language":
            s = ctx.state["stats"]
            c_ema = Q.ema_codebook(s["cluster_size"], s["embed_sum"], cb.eps)  # after the restarts
            codebook = Q.blend(Q.rescale_to(c_ema, rows), rows, self.alpha(ctx.step + 1))
        else:
            codebook = rows
        return {**params, "codebook": codebook.astype(params["codebook"].dtype), "token_ids": ids}

    # ---- evaluation ----------------------------------------------------------------------------
    def evaluators(self):
        out = {}
        for name, spec in self.config.evals.items():
            if spec.task != "reconstruct":
                raise ConfigError(f"evals.{name}.task={spec.task!r}; stage 1 evaluates reconstruct")

            def step(params, batch, ctx):
                agg, codes, _, _ = self.tokenize(params, batch["images"])
                recon = self.decode(params, agg)
                unit = lambda a: Q.rescale_to(a, jnp.ones_like(a[:, :1]))  # noqa: E731
                cos = jnp.sum(unit(self.codebook(params)) * unit(self.llm_rows(params)), -1).mean()
                return {
                    "psnr": psnr(recon, to_float(batch["images"])),
                    "codes": codes.reshape(codes.shape[0], -1),
                    "image": batch["images"],
                    "recon": jnp.clip((recon + 1) * 127.5, 0, 255).astype(jnp.uint8),
                    "cosine": jnp.full((codes.shape[0],), cos),
                }

            out[name] = Evaluator(spec, preprocess, step, self._finalize)
        return out

    def _finalize(self, out):
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
