"""ViT on the shapes world: multi-label recognition of which (colour, shape) pairs a scene
holds. The first recipe, exercising the trainer end to end; its ViT is the one later
recipes use."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax

from mmjax.data import shapes
from mmjax.models.vit import ViT
from mmjax.recipes.base import Evaluator, Recipe as BaseRecipe

NUM_CLASSES = len(shapes.COLORS) * len(shapes.SHAPES)


def preprocess(record: dict) -> dict:
    """Image to [-1, 1] floats; the scene's objects to a multi-hot (colour, shape) vector."""
    labels = np.zeros(NUM_CLASSES, np.float32)
    n = int(record["num_objects"])
    labels[record["obj_color"][:n] * len(shapes.SHAPES) + record["obj_shape"][:n]] = 1.0
    return {"image": record["image"].astype(np.float32) / 127.5 - 1.0, "labels": labels}


def model_from_config(mc) -> ViT:
    return ViT(
        num_classes=NUM_CLASSES,
        patch_size=mc.patch_size,
        width=mc.width,
        depth=mc.depth,
        num_heads=mc.num_heads,
        mlp_dim=mc.mlp_dim,
        pool=mc.pool,
        dtype=jnp.dtype(mc.dtype),
        scan=mc.scan,
        remat=mc.remat,
    )


class Recipe(BaseRecipe):
    def __init__(self, config):
        super().__init__(config)
        self.model = model_from_config(config.model)

    def init(self, rng):
        s = self.config.data.image_size
        return self.model.init(rng, jnp.zeros((1, s, s, 3), jnp.float32))

    def preprocess(self, component):
        return preprocess

    def logits(self, params, images, train=False, rng=None):
        rngs = {"dropout": rng} if rng is not None else {}
        logits, _ = self.model.apply({"params": params}, images, train=train, rngs=rngs)
        return logits.astype(jnp.float32)

    def loss(self, params, batch, ctx):
        logits = self.logits(params, batch["image"], train=True, rng=ctx.rng)
        loss = optax.sigmoid_binary_cross_entropy(logits, batch["labels"]).mean()
        return loss, _accuracy(logits, batch["labels"])

    def evaluators(self):
        def step(params, batch, ctx):
            pred, true = self.logits(params, batch["image"]) > 0, batch["labels"] > 0.5
            return {
                "tp": (pred & true).sum(-1),
                "fp": (pred & ~true).sum(-1),
                "fn": (~pred & true).sum(-1),
                "scene_correct": (pred == true).all(-1),
            }

        return {name: Evaluator(spec, preprocess, step, _summary) for name, spec in self.config.evals.items()}


def _summary(out: dict) -> dict:
    """Micro precision / recall / F1 over present (colour, shape) pairs, and exact scenes."""
    tp, fp, fn = (float(out[k].sum()) for k in ("tp", "fp", "fn"))
    precision, recall = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    return {
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / max(precision + recall, 1e-9),
        "scene_accuracy": float(out["scene_correct"].mean()),
    }


def _accuracy(logits, labels):
    correct = (logits > 0) == (labels > 0.5)
    return {"label_accuracy": correct.mean(), "scene_accuracy": correct.all(-1).mean()}
