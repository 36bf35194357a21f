"""Optimizers from config: AdamW / LAMB / Adafactor, warm-up + cosine with a floor, global
gradient clipping, parameter groups with learning-rate multipliers, and freezing.

Parameters are addressed by their flattened names (`ViT/block_0/attn/query/kernel`).
Frozen parameters are not handed to the optimizer at all, so they get no gradient and no
optimizer state; the trainer differentiates only the trainable ones.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import optax

from mmjax import tree
from mmjax.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Optimizer:
    tx: optax.GradientTransformation
    schedule: Callable  # step -> base learning rate
    trainable: tuple[str, ...]
    groups: dict[str, str]  # trainable name -> group label


def mm1_lr_law(num_params: int) -> tuple[float, float]:
    """MM1's (peak learning rate, weight decay) for a model of `num_params` parameters:
    eta = exp(-0.4214 ln N - 0.5535), decoupled decay lambda = 0.1 eta per step.

    optax's adamw multiplies its weight_decay by the learning rate, so lambda = 0.1 eta is
    weight_decay = 0.1 here (and it follows the schedule, as in MM1's AXLearn optimizer)."""
    eta = math.exp(-0.4214 * math.log(num_params) - 0.5535)
    return eta, 0.1


def resolve_lr_law(cfg, num_params: int):
    """`cfg` with lr and weight_decay set by `cfg.lr_law` ('' keeps them as configured)."""
    if not cfg.get("lr_law"):
        return cfg
    if cfg.lr_law != "mm1":
        raise ConfigError(f"optim.lr_law={cfg.lr_law!r}; choose '' (use optim.lr) or 'mm1'")
    cfg = cfg.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.lr, cfg.weight_decay = mm1_lr_law(num_params)
    return cfg


def schedule(cfg, total_steps: int) -> Callable:
    floor = cfg.lr * cfg.lr_floor
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, cfg.lr, cfg.warmup_steps, max(total_steps, cfg.warmup_steps + 1), floor
        )
    if cfg.schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1)), optax.constant_schedule(cfg.lr)],
            [cfg.warmup_steps],
        )
    raise ConfigError(f"optim.schedule={cfg.schedule!r}; choose cosine or constant")


def _adamw(cfg, lr, mask):
    return optax.adamw(lr, cfg.b1, cfg.b2, cfg.eps, weight_decay=cfg.weight_decay, mask=mask)


def _lamb(cfg, lr, mask):
    return optax.lamb(lr, cfg.b1, cfg.b2, cfg.eps, weight_decay=cfg.weight_decay, mask=mask)


def _adafactor(cfg, lr, mask):
    return optax.adafactor(lr, weight_decay_rate=cfg.weight_decay or None, weight_decay_mask=mask)


OPTIMIZERS = {"adamw": _adamw, "lamb": _lamb, "adafactor": _adafactor}  # optim.name -> builder


def decays(path, p) -> bool:
    """Weight decay on matrices only: not on norms, biases (of any rank), scalars like a logit scale."""
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    return p.ndim > 1 and name.rsplit("/", 1)[-1] not in ("bias", "scale")


def _base(cfg, lr) -> optax.GradientTransformation:
    decay_mask = lambda params: jax.tree_util.tree_map_with_path(decays, params)  # noqa: E731
    if cfg.name not in OPTIMIZERS:
        raise ConfigError(f"optim.name={cfg.name!r}; choose {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[cfg.name](cfg, lr, decay_mask)


def build(cfg, param_names: dict, total_steps: int, fixed: tuple[str, ...] = ()) -> Optimizer:
    """The optax transformation over the trainable parameters (a flat name -> array dict); `fixed`:
    patterns of parameters the recipe itself writes (`Recipe.fixed_params`), frozen like
    `cfg.freeze` but needing no config entry."""
    cfg = resolve_lr_law(cfg, sum(a.size for a in param_names.values()))
    names = list(param_names)
    frozen = set()
    frozen.update(n for pattern in fixed for n in tree.match(pattern, names))
    for pattern in cfg.freeze:
        hit = tree.match(pattern, names)
        if not hit:
            raise ConfigError(
                f"optim.freeze pattern {pattern!r} matches no parameter; names look like {names[0]!r}"
            )
        frozen.update(hit)
    trainable = tuple(n for n in names if n not in frozen)
    if not trainable:
        raise ConfigError("optim.freeze freezes every parameter; nothing would train")
    labels = dict.fromkeys(trainable, "default")
    mults = {"default": 1.0}
    for i, (pattern, mult) in enumerate(cfg.groups):
        hit = [n for n in tree.match(pattern, trainable) if labels[n] == "default"]
        if not hit:
            raise ConfigError(f"optim.groups[{i}] pattern {pattern!r} matches no trainable parameter")
        labels.update(dict.fromkeys(hit, f"group_{i}"))
        mults[f"group_{i}"] = float(mult)
    sched = schedule(cfg, total_steps)
    per_group = {
        g: _base(cfg, (lambda s, m=m: m * sched(s)) if m != 1.0 else sched) for g, m in mults.items()
    }
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    tx = optax.chain(*parts, optax.multi_transform(per_group, lambda params: {n: labels[n] for n in params}))
    return Optimizer(tx, sched, trainable, labels)
