"""Configs: load `configs/NAME.py[:VARIANT]`, apply `key.sub=VALUE` overrides, validate.

A config file defines `get_config(arg=None) -> ml_collections.ConfigDict`. The loaded
config is locked, so a misspelt key in an override is an error that names the key and the
closest existing ones. `validate` checks everything that can be checked before anything
compiles and says what to change.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import math
import os

import ml_collections


class ConfigError(ValueError):
    """A config that cannot run; the message says what to change."""


def load(spec: str, overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """Loads `path/to/config.py[:variant]` and applies `key.sub=value` overrides."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist (expected configs/NAME.py[:VARIANT])")
    module_spec = importlib.util.spec_from_file_location(f"_mmjax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} has no get_config(arg) function")
    variants = getattr(module, "VARIANTS", None)
    if variants is not None and (arg or variants[0]) not in variants:
        raise ConfigError(f"{path} has no variant {arg!r}; variants: {', '.join(variants)}")
    config = module.get_config(arg or None)
    config.lock()
    for override in overrides:
        apply_override(config, override)
    return config


def pipeline(*stages) -> ml_collections.ConfigDict:
    """A multi-stage run: `stages` are (name, config, links) in order; `links` maps a config entry of
    that stage to an earlier stage whose export fills its path: {"init.mm1": "pretrain"} starts
    from it, {"frozen.mllm": "mllm"} holds it fixed ("stage:part" names an export part); a path given
    on the command line wins, and a stage whose exports nobody then needs is skipped. Each stage's
    config is a key of the pipeline, so `--config.sft.train.steps=100` overrides one stage."""
    c = ml_collections.ConfigDict()
    c.stages = tuple(name for name, _, _ in stages)
    c.links = ml_collections.ConfigDict({name: tuple(sorted(links.items())) for name, _, links in stages})
    for name, config, links in stages:
        for key, source in links.items():
            section, _, entry = key.partition(".")
            if section not in ("init", "frozen") or entry not in config[section]:
                raise ConfigError(
                    f"pipeline stage {name!r}: link {key!r} names no init/frozen entry of its config"
                )
            if source.partition(":")[0] not in c.stages[: c.stages.index(name)]:
                raise ConfigError(
                    f"pipeline stage {name!r}: {key} comes from {source!r}, not an earlier stage"
                )
            config[section][entry].path = ""  # filled from the stage's export; an override wins
        c[name] = config
    return c


def apply_override(config: ml_collections.ConfigDict, override: str) -> None:
    """Sets `a.b.c=value`; the value is parsed as a Python literal when it is one."""
    key, sep, raw = override.partition("=")
    key = key.strip().removeprefix("--").removeprefix("config.")
    if not sep:
        raise ConfigError(f"override {override!r} must look like key.sub=VALUE")
    *parents, leaf = key.split(".")
    node = config
    for i, name in enumerate(parents):
        node = _child(node, name, ".".join(parents[: i + 1]))
    _child(node, leaf, key)  # raises for unknown keys
    old = node[leaf]
    node[leaf] = _coerce(raw, old, key)


def _child(node, name: str, full: str):
    if not isinstance(node, ml_collections.ConfigDict) or name not in node:
        keys = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        close = difflib.get_close_matches(name, keys, n=3)
        hint = (
            f"; did you mean {', '.join(close)}?"
            if close
            else f"; known keys here: {', '.join(sorted(keys))}"
        )
        raise ConfigError(f"unknown config key {full!r}{hint}")
    return node[name]


def _coerce(raw: str, old, key: str):
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    if isinstance(old, bool):
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise ConfigError(f"{key} is a bool; got {raw!r}")
    elif isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    elif isinstance(old, ml_collections.ConfigDict) and isinstance(value, dict):
        return ml_collections.ConfigDict(value)  # e.g. --config.evals={} (no evaluators)
    elif isinstance(old, str):
        return value if isinstance(value, str) else raw
    elif (
        old is not None
        and not isinstance(value, type(old))
        and not (isinstance(old, (tuple, list)) and isinstance(value, (tuple, list)))
    ):
        raise ConfigError(f"{key} is a {type(old).__name__}; got {raw!r}")
    return tuple(value) if isinstance(old, tuple) and isinstance(value, list) else value


def to_json(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json())


def mesh_shape(mesh_config, num_devices: int) -> dict[str, int]:
    """Resolves the mesh axes (one may be -1 = all remaining devices) against the devices."""
    axes = dict(mesh_config.items())
    if sum(v == -1 for v in axes.values()) > 1:
        raise ConfigError(f"mesh {axes}: at most one axis may be -1")
    fixed = math.prod(v for v in axes.values() if v != -1)
    if any(v == 0 or v < -1 for v in axes.values()):
        raise ConfigError(f"mesh {axes}: axis sizes must be positive or -1")
    if -1 in axes.values():
        if num_devices % fixed:
            raise ConfigError(
                f"mesh {axes}: the fixed axes use {fixed} devices, which does not divide the "
                f"{num_devices} available; change the mesh sizes so their product divides {num_devices}"
            )
        axes = {k: (num_devices // fixed if v == -1 else v) for k, v in axes.items()}
    elif fixed != num_devices:
        raise ConfigError(
            f"mesh {axes} needs {fixed} devices but {num_devices} are available; set one axis to -1 "
            f"(e.g. --config.mesh.data=-1) or make the product {num_devices} (on a CPU, "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={fixed} fakes {fixed} devices)"
        )
    return axes


def batch_axes(config) -> tuple[str, ...]:
    """The mesh axes that the logical `batch` axis is sharded over."""
    for name, target in config.sharding_rules:
        if name == "batch":
            return (target,) if isinstance(target, str) else tuple(target or ())
    return ()


def mesh_shapes(config, num_devices: int, num_granules: int = 1) -> tuple[dict[str, int], dict[str, int]]:
    """(within, across): `config.mesh` resolved against the devices of one slice or host, and
    `config.mesh_dcn` over the `num_granules` slices (TPU multislice) or hosts."""
    dcn = dict(config.mesh_dcn.items())
    if extra := sorted(set(dcn) - set(config.mesh)):
        raise ConfigError(f"mesh_dcn names axes {extra} that config.mesh lacks ({sorted(config.mesh)})")
    if any(v < 1 for v in dcn.values()):
        raise ConfigError(f"mesh_dcn {dcn}: sizes must be >= 1 (1 = not across slices or hosts)")
    across = math.prod(dcn.values())
    if across > 1 and across != num_granules:
        raise ConfigError(
            f"mesh_dcn {dcn} spans {across} slices or hosts, but this run has {num_granules} "
            f"({num_devices} devices); make the product of mesh_dcn {num_granules}, or set every mesh_dcn axis to 1"
        )
    return mesh_shape(config.mesh, num_devices // across), {k: dcn.get(k, 1) for k in config.mesh}


def validate(config, num_devices: int, num_processes: int = 1, num_granules: int = 1) -> dict[str, int]:
    """Checks a config before anything compiles; returns the resolved mesh shape (within a slice
    or host times across them)."""
    from mmjax.data import pipeline  # the registries of data sources and optimizers
    from mmjax.train import optim

    within, across = mesh_shapes(config, num_devices, num_granules)
    shape = {k: v * across[k] for k, v in within.items()}
    unknown = [a for a in batch_axes(config) if a not in shape]
    if unknown:
        raise ConfigError(f"sharding rule for 'batch' names mesh axes {unknown} that config.mesh lacks")
    dp = math.prod(shape[a] for a in batch_axes(config))
    tc = config.train
    if tc.grad_accum < 1:
        raise ConfigError(f"train.grad_accum={tc.grad_accum} must be >= 1 (1 = no accumulation)")
    gb, accum = config.data.global_batch_size, tc.grad_accum
    if gb % (dp * accum):
        raise ConfigError(
            f"data.global_batch_size={gb} must be divisible by the data-parallel size {dp} "
            f"(mesh axes {batch_axes(config)}) times train.grad_accum={accum}; "
            f"use a multiple of {dp * accum}"
        )
    if gb % num_processes:
        raise ConfigError(f"data.global_batch_size={gb} must be divisible by the {num_processes} processes")
    for key in ("steps", "log_every", "save_every", "eval_every", "keep_period", "max_bad_steps"):
        if tc[key] < 0 or (key == "steps" and tc[key] == 0):
            off = "" if key == "steps" else " (0 turns it off)"
            raise ConfigError(f"train.{key}={tc[key]} must be {'> 0' if key == 'steps' else '>= 0'}{off}")
    if config.profile.steps < 0 or config.profile.start_step < 1:
        raise ConfigError(f"profile {dict(config.profile)}: steps must be >= 0 (0 = off) and start_step >= 1")
    if tc.keep < 1:
        raise ConfigError(f"train.keep={tc.keep} must be >= 1 (how many recent checkpoints to keep)")
    if not 0.0 <= tc.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay={tc.ema_decay} must be in [0, 1) (0 = no EMA; e.g. 0.999)")
    if not config.data.components:
        raise ConfigError("data.components is empty; name at least one data source")
    shards = config.data.shards or num_processes
    if shards % num_processes or gb % shards:
        raise ConfigError(
            f"data.shards={config.data.shards} must be a multiple of the {num_processes} processes and divide "
            f"data.global_batch_size={gb}"
        )
    if not 0.0 <= config.data.max_skip_rate <= 1.0:
        raise ConfigError(f"data.max_skip_rate={config.data.max_skip_rate} must be in [0, 1]")
    for name, comp in config.data.components.items():
        where = f"data.components.{name}"
        if comp.weight <= 0:
            raise ConfigError(f"{where}.weight={comp.weight} must be > 0")
        _check_source(comp, where, pipeline.SOURCES)
    for name, ev in config.evals.items():
        where = f"evals.{name}"
        _check_source(ev, where, pipeline.SOURCES)
        if ev.batch_size % math.lcm(dp, num_processes):
            raise ConfigError(
                f"{where}.batch_size={ev.batch_size} must be divisible by the data-parallel size {dp} "
                f"and the {num_processes} processes; use a multiple of {math.lcm(dp, num_processes)}"
            )
        if ev.num_examples % ev.batch_size:
            raise ConfigError(
                f"{where}.num_examples={ev.num_examples} must be a multiple of its batch_size={ev.batch_size}"
            )
    for section, keys in (("init", {"path", "into", "skip"}), ("frozen", {"path", "into", "dtype"})):
        for name, spec in config.get(section, {}).items():
            unknown = set(spec) - keys
            if unknown:
                raise ConfigError(
                    f"{section}.{name} has unknown keys {sorted(unknown)}; use {', '.join(sorted(keys))}"
                )
            if spec.get("path") and not _is_weights_folder(spec.path):
                raise ConfigError(
                    f"{section}.{name}.path={spec.get('path')!r} is not an mmjax weights folder; make one with "
                    f"`mmjax convert hf-import SRC DST` or `mmjax export`, or fix the path"
                )
    if config.optim.name not in optim.OPTIMIZERS:
        raise ConfigError(f"optim.name={config.optim.name!r}; choose {', '.join(optim.OPTIMIZERS)}")
    return shape


def _check_source(comp, where: str, sources) -> None:
    if comp.source not in sources:
        raise ConfigError(f"{where}.source={comp.source!r}; available: {', '.join(sources)}")
    if comp.get("cache") and not comp.get("num_records"):
        raise ConfigError(
            f"{where}.cache=True needs a finite {where}.num_records (how many records to hold in memory)"
        )
    if comp.get("path") and not _exists(comp.path):
        raise ConfigError(
            f"{where}.path={comp.path!r} does not exist; point it at the local data (mmjax never "
            f"downloads) or drop the component"
        )


def _exists(p) -> bool:
    from mmjax.paths import resolve

    return resolve(p).exists()


def _is_weights_folder(p) -> bool:
    from mmjax.paths import resolve

    return (resolve(p) / "mmjax.json").exists()


# Logical axis -> mesh axes. Activations (`act_*`) and parameters have separate names so
# that, e.g., parameters can be FSDP-sharded over `fsdp` while activations shard batch.
# Expert parallelism: `batch` also shards over `expert`, so outside MoE layers the expert axis
# carries data (no replicated attention/dense compute); inside them tokens move to their experts'
# devices (`expert_group`: the token groups there, sharded over the remaining data axes).
DEFAULT_RULES = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("patch", None),
    ("conv", None),  # conv feature widths (autoencoders): replicated, see models/autoencoder_kl.py
    ("layers", None),
    ("expert", "expert"),
    ("expert_group", ("data", "fsdp")),
)


def base() -> ml_collections.ConfigDict:
    """Defaults every recipe config starts from: mesh, rules, data, optimizer, trainer."""
    c = ml_collections.ConfigDict()
    c.recipe = ""
    c.seed = 0
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1))
    # Axes across slices (TPU multislice) or hosts (GPU nodes) over the data-centre network; `mesh`
    # is then the mesh within one slice or host, and each axis's size is the product of the two.
    c.mesh_dcn = ml_collections.ConfigDict(dict(data=1, fsdp=1, expert=1, tensor=1))
    # Multi-host start (mmjax/distributed.py): on when a launcher sets MMJAX_DISTRIBUTED /
    # MMJAX_COORDINATOR or `enabled`; empty fields are left to JAX's cluster detection.
    c.distributed = ml_collections.ConfigDict(
        dict(
            enabled=False,
            coordinator="",  # host:port of process 0
            num_processes=0,
            process_id=-1,
            local_device_ids="",  # e.g. "0,1,2,3": this process's GPUs (default: detected)
            cluster_detection="",  # JAX's method name, e.g. "slurm", "gke_tpu" (default: try each)
            initialization_timeout_s=300,  # for every process to arrive
            heartbeat_timeout_s=100,  # a process silent this long is lost; the others stop
            shutdown_timeout_s=300,
            supervise=True,  # explain a lost peer in mmjax's words (mmjax/distributed.py)
        )
    )
    c.sharding_rules = DEFAULT_RULES
    c.data = ml_collections.ConfigDict(
        dict(
            global_batch_size=32,
            image_size=32,
            # Worker processes pay off on hosts with spare cores; on a small CPU host they add
            # start-up and IPC without adding cores (BENCHMARKS.md, input pipeline).
            num_workers=0,
            prefetch=2,
            # the run stops when more than this share of the records read were skipped (corrupt,
            # unreadable, too long): counted in the logs as data/skipped and data/skip_rate
            max_skip_rate=0.05,
            # data shards (0: the process count when the run starts): the stream is a function of
            # this count, and a run resumes on any process count that divides it
            shards=0,
            components=ml_collections.ConfigDict(),
        )
    )
    c.optim = ml_collections.ConfigDict(
        dict(
            name="adamw",
            lr=1e-3,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=1e-4,
            schedule="cosine",
            warmup_steps=10,
            lr_floor=0.0,  # the schedule's end, as a fraction of the peak
            lr_law="",  # 'mm1': lr and weight_decay from the parameter count (optim.mm1_lr_law)
            clip_norm=1.0,
            groups=(),
            freeze=(),
        )
    )
    c.train = ml_collections.ConfigDict(
        dict(
            steps=100,
            # 0 turns each off: logs and saves then happen at the last step (and on preemption) only
            log_every=10,
            eval_every=0,
            save_every=100,
            keep=3,  # recent checkpoints kept; keep_period > 0 also keeps every keep_period-th
            keep_period=0,
            grad_accum=1,
            ema_decay=0.0,
            max_bad_steps=20,
        )
    )
    c.evals = ml_collections.ConfigDict()
    # Weights to start from (mmjax/weights.py): name -> dict(path, into, skip).
    c.init = ml_collections.ConfigDict()
    # Models held fixed, loaded at every start and never saved: name -> dict(path, into, dtype).
    c.frozen = ml_collections.ConfigDict()
    # Weights & Biases, besides metrics.jsonl and TensorBoard (process 0; mode online/offline/disabled).
    c.wandb = ml_collections.ConfigDict(
        dict(enabled=False, project="mmjax", entity="", name="", mode="online", tags=())
    )
    # A jax.profiler trace of `steps` train steps from `start_step` on, into WORKDIR/profile (0: off).
    c.profile = ml_collections.ConfigDict(dict(start_step=3, steps=0))
    # Fault injection for tests: a signal at a step (to one process, or -1: all); non-finite inputs from a step on.
    c.debug = ml_collections.ConfigDict(
        dict(kill_at_step=-1, kill_signal="SIGKILL", kill_process=-1, nan_from_step=-1)
    )
    return c


def geneval(
    prompts_per_task: int = 8, samples_per_prompt: int = 4, batch_size: int = 48
) -> ml_collections.ConfigDict:
    """The GenEval-style prompt set as a text-to-image evaluation: every sample of every prompt of
    the six task types (mmjax/eval/shapes_eval.py)."""
    return component(
        source="geneval",
        split="test",
        task="t2i",
        prompts_per_task=prompts_per_task,
        samples_per_prompt=samples_per_prompt,
        num_examples=6 * prompts_per_task * samples_per_prompt,
        batch_size=batch_size,
    )


def component(
    source="shapes",
    split="train",
    view="image",
    weight=1.0,
    path="",
    num_records=0,
    cache=False,
    **extra,
) -> ml_collections.ConfigDict:
    """One named data source of a mixture (or an evaluation's data).

    `cache=True` reads the component's `num_records` records once and serves them from memory
    (for sources that fit in RAM and cost more to produce than to keep, like rendered shapes).
    """
    return ml_collections.ConfigDict(
        dict(
            source=source,
            split=split,
            view=view,
            weight=weight,
            path=path,
            num_records=num_records,
            cache=cache,
            **extra,
        )
    )
