"""A small recipe that uses every piece of the recipe contract, for the trainer's tests:

- a non-gradient collection `stats` (k-means EMA statistics of features, sharded by axis names),
  updated from additive statistics the loss returns, with a decay that depends on the step;
- a parameter with a valid range (`scale`, clamped after every update), and one only the recipe
  writes (`centroids`: `fixed_params`, set by `constrain` from the state `update_state` made);
- a subtree (`body`) that configs may hold frozen (config.frozen), between trainable layers;
- an evaluator that makes images and uses its RNG; a sampler (an oracle that renders the scene
  each shapes-eval prompt describes).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax import config as C
from mmjax.data import shapes
from mmjax.eval import artefacts, shapes_eval
from mmjax.objectives.reduce import Mean, Sum
from mmjax.recipes.base import Evaluator, Export, Recipe as BaseRecipe

K, D = 8, 16
SCALE_MAX = float(np.log(2.0))


def preprocess(record: dict) -> dict:
    image = record["image"].astype(np.float32) / 255.0
    x = np.concatenate([image.mean((0, 1)), image.std((0, 1)), [1.0]]).astype(np.float32)
    return {"x": x, "y": np.float32(record["num_objects"]), "image": record["image"]}


def _dense(features, names, name):
    return nn.Dense(
        features, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names), name=name
    )


class Body(nn.Module):
    @nn.compact
    def __call__(self, h):
        return jnp.tanh(_dense(D, ("embed", "mlp"), "dense")(h))


class Toy(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = _dense(D, (None, "embed"), "embed")(x)
        h = Body(name="body")(h)
        counts = self.variable("stats", "counts", lambda: jnp.ones((K,), jnp.float32))
        sums = self.variable("stats", "sums", lambda: jax.random.normal(jax.random.key(3), (K, D)))
        scale = self.param("scale", nn.initializers.constant(0.0), ())
        self.param("centroids", nn.initializers.zeros, (K, D))
        y = _dense(1, ("mlp", None), "head")(h)[..., 0] * jnp.exp(scale)
        return y, h, counts.value, sums.value


def _boxed_stats(variables):
    """Logical axis names for the stats collection (codes over 'vocab', features over 'embed')."""
    stats = variables["stats"]
    return {
        **variables,
        "stats": {
            "counts": nn.LogicallyPartitioned(stats["counts"], ("vocab",)),
            "sums": nn.LogicallyPartitioned(stats["sums"], ("vocab", "embed")),
        },
    }


class Recipe(BaseRecipe):
    def __init__(self, config):
        super().__init__(config)
        self.model = Toy()

    def init(self, rng):
        return _boxed_stats(self.model.init(rng, jnp.zeros((1, 7), jnp.float32)))

    def preprocess(self, component):
        return preprocess

    def loss(self, params, batch, ctx):
        y, h, counts, sums = self.model.apply({"params": params, **ctx.state}, batch["x"])
        codebook = sums / counts[:, None]
        dist = ((h[:, None, :] - codebook[None]) ** 2).sum(-1)
        onehot = jax.nn.one_hot(jnp.argmin(dist, -1), K)
        stats = {"counts": onehot.sum(0), "sums": onehot.T @ jax.lax.stop_gradient(h)}
        err = (y - batch["y"]) ** 2
        metrics = {"examples": Sum(jnp.float32(err.shape[0])), "mse": Mean.of(err), "step_seen": ctx.step}
        return Mean.of(err), metrics, stats

    def update_state(self, state, stats, ctx):
        decay = jnp.where(ctx.step < 2, 0.5, 0.9)  # a schedule: the step reaches the hook
        old = state["stats"]
        return {
            "stats": {
                "counts": decay * old["counts"] + (1 - decay) * stats["counts"],
                "sums": decay * old["sums"] + (1 - decay) * stats["sums"],
            }
        }

    def fixed_params(self):
        return ("^centroids$",)

    def constrain(self, params, ctx):
        stats = ctx.state["stats"]
        centroids = stats["sums"] / stats["counts"][:, None]
        return {**params, "scale": jnp.minimum(params["scale"], SCALE_MAX), "centroids": centroids}

    def evaluators(self):
        def step(params, batch, ctx):
            y, _, _, _ = self.model.apply({"params": params, **ctx.state}, batch["x"])
            return {
                "err": (y - batch["y"]) ** 2,
                "noise": jax.random.uniform(ctx.rng, y.shape),
                "image": batch["image"],
            }

        def finalize(out):
            return {
                "mse": float(out["err"].mean()),
                "noise": float(out["noise"].mean()),
                "samples": artefacts.Images(
                    out["image"][:8], tuple(f"err {e:.2f}" for e in out["err"][:8]), columns=4
                ),
            }

        return {name: Evaluator(spec, preprocess, step, finalize) for name, spec in self.config.evals.items()}

    def exports(self):
        return {**super().exports(), "body": Export("body", {"kind": "toy_body"})}

    def sample(self, params, prompts, num_samples, ctx):
        rng = np.random.default_rng(0)
        out = []
        for p in prompts:
            prompt = shapes_eval.Prompt(p["task"], p["text"], p["spec"])
            out.append(
                [
                    {"image": shapes.render(shapes_eval.scene_for_prompt(prompt, rng), 32)}
                    for _ in range(num_samples)
                ]
            )
        return out


VARIANTS = ("tiny", "pipeline")


def get_config(arg=None):
    if arg == "pipeline":  # stage b holds stage a's trained body frozen
        b = get_config()
        b.frozen.body = dict(path="", into="body", dtype="bfloat16")
        return C.pipeline(("a", get_config(), {}), ("b", b, {"frozen.body": "a:body"}))
    c = C.base()
    c.recipe = "tests.toy_recipe"
    c.model = dict(kind="toy")
    c.data.components.shapes = C.component(view="image", num_records=256, cache=True)
    c.data.global_batch_size = 16
    c.evals.val = C.component(split="val", view="image", num_examples=32, batch_size=16)
    c.optim.update(lr=0.3, warmup_steps=0, schedule="constant")
    c.train.update(steps=6, log_every=1, save_every=3)
    return c
