"""`mmjax plan`: a config's train step compiled from abstract shapes for N devices, its per-device
memory (parameters, optimizer state, temporaries, peak) and FLOPs per step, and which fsdp size,
remat policy or gradient accumulation would make it fit a per-device memory.

  mmjax plan --config configs/mm1.py:3b --topology v5p:4x4x4       # the TPU compiler, no TPU needed
  mmjax plan --config configs/mm1.py:3b --devices 8 --memory-gb 16  # fake CPU devices

With `--topology` the step is compiled by libtpu (`pip install mmjax[tpu]`) for that slice's
compile-only devices: every figure is the TPU compiler's, and a step that cannot fit the chip's HBM
does not compile (it is reported as out of memory). Without it, on `--devices N` fake CPU devices,
the state bytes are still exact (they follow from the shardings) but temporaries are the CPU
compiler's estimate, which can differ a lot from a TPU's. FLOPs are counted on the step's jaxpr
(matmuls and convolutions, every scan step, remat's recompute): XLA's own count, also printed,
counts a scanned layer stack's body once. Nothing is allocated or trained.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time

from mmjax.config import ConfigError

GiB = 2**30
# Per chip: the HBM the TPU compiler says a program may use (its RESOURCE_EXHAUSTED messages name
# 15.75 GiB of v5e's 16 and 95.74 of v5p's); v4 and v6e: the chip's capacity
HBM_GIB = {"TPU v4": 32, "TPU v5 lite": 15.75, "TPU v5": 95.74, "TPU v6 lite": 32}


def topology_devices(name: str) -> list:
    """The compile-only devices of a TPU slice, e.g. 'v5e:4x4' or 'v5p:2x2x2' (needs libtpu)."""
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        raise ConfigError(f"--topology {name!r}: compiling for a TPU needs libtpu; pip install 'mmjax[tpu]'")
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
    except Exception as e:  # libtpu's message says what is wrong with the name
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "lockfile" in msg:  # another process holds libtpu; compile-only devices can share it
            msg += "; to plan beside it, set ALLOW_MULTIPLE_LIBTPU_LOAD=1"
        raise ConfigError(
            f"--topology {name!r}: {msg} (use GENERATION:CHIPS, e.g. v5e:2x4, v5e:16x16, v5p:2x2x2, v5p:4x8x8)"
        ) from None


def cpu_devices(n: int) -> list:
    """`n` of this process's devices (fake CPU devices: XLA_FLAGS=--xla_force_host_platform_device_count)."""
    import jax

    have = jax.devices()
    if n > len(have):
        raise ConfigError(
            f"--devices {n}: this process has {len(have)} {have[0].platform} devices; run it with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={n} (mmjax plan sets this itself when it "
            "starts jax), or plan for a TPU with --topology"
        )
    return have[:n]


def _bytes(tree, shardings, per_device=True) -> int:
    import jax
    import numpy as np

    total = 0
    for a, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        shape = s.shard_shape(a.shape) if per_device else a.shape
        total += math.prod(shape) * np.dtype(a.dtype).itemsize
    return total


def _flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


def _spec_axes(params) -> set:
    """The manual mesh axes a shard_map's in and out specs split arrays over."""
    names = set()
    for spec in (*params["in_specs"], *params["out_specs"]):
        for entry in spec:
            names.update((entry,) if isinstance(entry, str) else entry or ())
    return names & set(params["newly_manual_axes"])


def matmul_flops(jaxpr) -> float:
    """FLOPs of the dot products and convolutions of a (closed) jaxpr, a scan's body times its
    length (XLA's cost analysis counts a loop body once), a Pallas kernel's body times its grid, a
    shard_map's body times its shards, a cond's costliest branch; what remat recomputes is in the
    differentiated jaxpr, so it counts. Elementwise work is left out."""
    from jax.extend import core

    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name, out = eqn.primitive.name, eqn.outvars[0].aval if eqn.outvars else None
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval
            total += 2.0 * math.prod(out.shape) * math.prod(lhs.shape[d] for d in contract)
        elif name == "conv_general_dilated":  # the kernel's input features are already C / groups
            rhs, spec = eqn.invars[1].aval, eqn.params["dimension_numbers"].rhs_spec
            total += 2.0 * math.prod(out.shape) * math.prod(rhs.shape[d] for d in spec[1:])
        subs = [matmul_flops(j) for j in core.jaxprs_in_params(eqn.params)]
        if name == "cond":
            total += max(subs, default=0.0)
        elif name == "pallas_call":  # a kernel's body runs once per grid point (skipped blocks too)
            total += sum(subs) * math.prod(eqn.params["grid_mapping"].grid)
        elif name == "shard_map":  # the body sees one shard: times the shards its specs split into
            total += sum(subs) * math.prod(eqn.params["mesh"].shape[a] for a in _spec_axes(eqn.params))
        else:
            total += sum(subs) * (eqn.params["length"] if name == "scan" else 1)
    return total


def abstract_trainer(config, devices):
    """A Trainer over a mesh of `devices` (compile-only ones too); its state stays abstract."""
    from mmjax import parallel
    from mmjax.train import trainer as trainer_lib

    return trainer_lib.Trainer(config, "", mesh=parallel.make_mesh(config, devices))


def state_bytes(trainer, batch) -> dict:
    """The per-device bytes of each part of the train state and of the batch slice, exact (from
    the shardings), the state's total and its 1/N ideal; nothing is compiled."""
    state, sh = trainer.abstract_state, trainer.state_shardings
    other = ("model_state", "ema", "step", "bad_streak", "bad_total")
    parts = {
        "params": (state.params, sh.params),
        "opt_state": (state.opt_state, sh.opt_state),
        "other_state": ([getattr(state, k) for k in other], [getattr(sh, k) for k in other]),
        "frozen": (trainer.abstract_frozen, trainer.frozen_shardings),
        "batch": (batch, {k: trainer.batch_sharding for k in batch}),
    }
    n = trainer.mesh.size
    out = {"devices": n, "mesh": dict(trainer.mesh.shape), "num_params": trainer.num_params}
    out.update({f"{k}_bytes": _bytes(*v) for k, v in parts.items()})
    held = ("params", "opt_state", "other_state", "frozen")
    out["state_bytes"] = sum(out[f"{k}_bytes"] for k in held)
    out["state_ideal_bytes"] = sum(_bytes(*parts[k], per_device=False) for k in held) / n
    return out


def plan_one(config, devices) -> dict:
    """Compiles `config`'s train step for `devices` (a list; TPU compile-only devices or real ones);
    returns the per-device bytes of each part of the state (exact, from the shardings) and their
    1/N ideal, the jaxpr's matmul FLOPs, the compiler's memory analysis and FLOPs. A TPU compiler
    that runs out of HBM compiles nothing: then `oom` holds its message and `temp_bytes` the
    temporaries it named when it gave up (not stable from run to run)."""
    import jax

    from mmjax.train import trainer as trainer_lib

    start = time.perf_counter()
    trainer = abstract_trainer(config, devices)
    batch = trainer.abstract_batch_from_config()
    state = trainer.abstract_state
    out = {"device_kind": devices[0].device_kind, **state_bytes(trainer, batch)}
    with trainer._context():  # tracing only: mesh-independent, every step of every scan
        jaxpr = jax.make_jaxpr(trainer.train_step)(state, trainer.abstract_frozen, batch)
    out["matmul_flops"] = matmul_flops(jaxpr)
    try:
        compiled = trainer.compile_step(batch)
    except Exception as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        msg = str(e).splitlines()[0]
        need = re.search(r"temporaries \(([\d.]+)G\)", msg)
        out.update(oom=msg, compile_s=round(time.perf_counter() - start, 1), compiler_flops_per_device=None)
        return {**out, **({"temp_bytes": float(need.group(1)) * GiB} if need else {})}
    stats = trainer_lib.memory_stats(compiled)
    if stats:  # arguments + outputs not donated into them + scratch: what the step holds at once
        peak = stats["argument_bytes"] + stats["output_bytes"] - stats["alias_bytes"] + stats["temp_bytes"]
        out.update(stats, peak_bytes=peak)
    out.update(compiler_flops_per_device=_flops(compiled), compile_s=round(time.perf_counter() - start, 1))
    return out


# ---- what would fit ----------------------------------------------------------------------------
def _remat_keys(tree, prefix="model") -> list[str]:
    """The dotted keys of every `remat` setting under config.model."""
    keys = []
    for k, v in tree.items():
        if hasattr(v, "items"):
            keys += _remat_keys(v, f"{prefix}.{k}")
        elif k == "remat":
            keys.append(f"{prefix}.{k}")
    return keys


def _get(config, key):
    for part in key.split("."):
        config = config[part]
    return config


def _with(config, overrides: dict):
    c = config.copy_and_resolve_references()
    with c.unlocked():
        for key, value in overrides.items():
            parent, _, leaf = key.rpartition(".")
            _get(c, parent)[leaf] = value
    return c


def candidates(config, n: int) -> list[dict]:
    """Overrides to try, in order: none (the config as it is); larger fsdp sizes (powers of two
    times the config's resolved one, data = the rest: the data-parallel size and the per-device batch stay);
    each stronger remat policy (every model.*.remat) over those fsdp sizes; last, at the largest
    fsdp and strongest remat, train.grad_accum doubled (smaller micro-batches, the same batch)."""
    from mmjax import config as config_lib

    shape = config_lib.mesh_shape(config.mesh, n)
    fixed = math.prod(v for k, v in shape.items() if k not in ("data", "fsdp"))
    f, sizes = shape["fsdp"], []  # from the config's own (resolved: fsdp=-1 is every device)
    while f * fixed <= n and n % (f * fixed) == 0:
        sizes.append(f)
        f *= 2
    from mmjax.models import remat

    keys = _remat_keys(config.model) if "model" in config else []
    now = remat.canonical(_get(config, keys[0])) if keys else None
    policies = [None, *remat.ORDER[remat.ORDER.index(now) + 1 :]] if now in remat.ORDER else [None]
    out = [{}]
    for p in policies:
        remat = dict.fromkeys(keys, p) if p is not None else {}
        out += [{"mesh.data": -1, "mesh.fsdp": s, **remat} for s in sizes if (s, p) != (sizes[0], None)]
    last = dict(out[-1])
    dp = math.prod(shape[a] for a in config_lib.batch_axes(config))
    accum, gb = config.train.grad_accum * 2, config.data.global_batch_size
    while gb % (dp * accum) == 0:
        out.append({**last, "train.grad_accum": accum})
        accum *= 2
    return out


def _flags(overrides: dict, stage: str) -> list[str]:
    at = f"--config.{stage + '.' if stage else ''}"
    return [f"{at}{k}={v}" for k, v in overrides.items()]


def fit(config, devices, memory_bytes: float, first: dict, stage: str = "") -> dict:
    """The first candidate (see `candidates`) whose peak fits `memory_bytes`; `first`: the config's
    own plan (not compiled again)."""
    tried = []
    for over in candidates(config, len(devices)):
        row = {"overrides": _flags(over, stage)}
        try:
            r = plan_one(_with(config, over), devices) if over else first
        except Exception as e:  # e.g. a dimension an fsdp size does not divide
            tried.append({**row, "error": (str(e).splitlines() or [type(e).__name__])[0][:200]})
            continue
        row.update(mesh=r["mesh"], peak_bytes=r.get("peak_bytes"), compile_s=r["compile_s"])
        row.update({"oom": r["oom"]} if "oom" in r else {})
        tried.append(row)
        if r.get("peak_bytes") is not None and r["peak_bytes"] <= memory_bytes:
            return {"memory_bytes": memory_bytes, "fits": row, "tried": tried}
    return {"memory_bytes": memory_bytes, "fits": None, "tried": tried}


# ---- report ------------------------------------------------------------------------------------
def fits(r: dict) -> bool | None:
    """Whether a compiled TPU plan's peak fits the HBM a program may use (None: not known)."""
    hbm = HBM_GIB.get(r["device_kind"])
    return None if hbm is None or "peak_bytes" not in r else r["peak_bytes"] <= hbm * GiB


def table(r: dict, topology: str) -> str:
    hbm = HBM_GIB.get(r["device_kind"]) if topology and "fit" not in r else None
    g = lambda b: f"{b / GiB:10.3f} GiB" if b >= GiB / 10 else f"{b / 2**20:10.2f} MiB"
    where = f"{r['devices']} x {r['device_kind']}" + (f" ({topology})" if topology else " (fake CPU devices)")
    mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
    lines = [
        f"{r.get('stage') or 'train step'}: {r['num_params']:,} parameters (frozen models apart) on {where}, mesh {mesh}, "
        f"compiled in {r['compile_s']} s",
        "  per device:",
    ]
    for k, name in (
        ("params", "parameters"),
        ("opt_state", "optimizer state"),
        ("other_state", "EMA, model state"),
        ("frozen", "frozen models"),
    ):
        lines.append(f"  {name:<24}{g(r[k + '_bytes'])}")
    ratio = r["state_bytes"] / r["state_ideal_bytes"] if r["state_ideal_bytes"] else 1.0
    lines.append(
        f"  {'state (exact)':<24}{g(r['state_bytes'])}   1/N ideal {g(r['state_ideal_bytes']).strip()} (x{ratio:.3f})"
    )
    lines.append(f"  {'batch slice':<24}{g(r['batch_bytes'])}")
    if "note" in r:
        lines.append(f"  note: {r['note']}")
    if "argument_bytes" in r:  # a TPU's tiled layouts pad small arrays: more than the exact bytes
        lines.append(
            f"  {'arguments (compiler)':<24}{g(r['argument_bytes'])}   (state + batch slice as laid out)"
        )
    if "oom" in r:
        lines.append(f"  the TPU compiler gave up (its figure is where it stopped, not the need): {r['oom']}")
    elif "temp_bytes" in r:
        whose = "the TPU compiler's" if topology else "a CPU compiler's estimate, not a TPU's"
        lines.append(f"  {'temporaries':<24}{g(r['temp_bytes'])}   ({whose})")
        lines.append(f"  {'peak':<24}{g(r['peak_bytes'])}   (arguments + outputs - donated + temporaries)")
    n, mm = r["devices"], r["matmul_flops"]
    lines.append(
        f"  FLOPs per step: {mm:.3e} in matmuls and convolutions ({mm / n:.3e} per device; jaxpr count)"
    )
    if r["compiler_flops_per_device"] is not None:
        lines.append(
            f"  the compiler's count: {r['compiler_flops_per_device']:.3e} per device (counts each scan body once)"
        )
    if hbm and fits(r) is not None:
        verdict = "fits" if fits(r) else "does not fit"
        lines.append(
            f"  the peak {verdict} the {hbm} GiB of HBM a program may use (--memory-gb N searches for what fits N GiB)"
        )
    if "fit" in r:
        f = r["fit"]
        limit = f"{f['memory_bytes'] / GiB:g} GiB"
        for t in f["tried"]:
            mesh = " ".join(f"{k}={v}" for k, v in t.get("mesh", {}).items())
            if "error" in t:
                got = t["error"]
            elif "oom" in t:
                got = f"mesh {mesh}: the compiler gave up, out of memory"
            else:
                got = f"mesh {mesh}: peak {t['peak_bytes'] / GiB:.2f} GiB"
            lines.append(f"  tried {' '.join(t['overrides']) or 'the config as it is'}: {got}")
        if f["fits"] is None:
            lines.append(
                f"  nothing tried fits {limit}: lower data.global_batch_size or plan for more devices"
            )
        else:
            lines.append(f"  fits {limit} with: {' '.join(f['fits']['overrides']) or 'the config as it is'}")
    return "\n".join(lines)


def _train_only(config, n: int):
    """(config, note): the train step does not use the evaluators, so eval batch sizes that do not
    suit `n` devices are noted, and the evaluators dropped, instead of stopping the plan."""
    from mmjax import config as config_lib

    try:
        config_lib.validate(config, n)
        return config, ""
    except ConfigError as e:
        if not str(e).startswith("evals."):
            raise
        c = config.copy_and_resolve_references()
        c.evals = {}
        return c, f"evaluators left out: {e}"


def plan(config, devices: int = 0, topology: str = "", memory_gb: float = 0.0) -> list[dict]:
    """Plans `config` (every stage of a pipeline, its links left open like `mmjax check`)."""
    return list(stages_plans(config, devices, topology, memory_gb))


def stages_plans(config, devices: int = 0, topology: str = "", memory_gb: float = 0.0):
    """`plan`, one stage at a time (a pipeline's stages compile for minutes each at full scale)."""
    from mmjax.train import stages

    devs = topology_devices(topology) if topology else cpu_devices(devices or 1)
    if topology and devices and devices != len(devs):
        raise ConfigError(f"--devices {devices} but topology {topology} has {len(devs)} chips")
    for name, part in stages.parts(config):
        part, note = _train_only(part, len(devs))
        r = {**({"stage": name} if name else {}), **plan_one(part, devs), **({"note": note} if note else {})}
        if memory_gb:
            r["fit"] = fit(part, devs, memory_gb * GiB, r, name)
        yield r


def main(args, overrides) -> int:
    """The `mmjax plan` command (mmjax/cli.py)."""
    if args.devices and not args.topology:  # N fake CPU devices, set before jax starts its CPU backend
        import jax

        jax.config.update("jax_num_cpu_devices", args.devices)  # wins over XLA_FLAGS' device count
    from mmjax import config as config_lib

    try:
        config = config_lib.load(args.config, overrides)
        for r in stages_plans(config, args.devices, args.topology, args.memory_gb):
            print(json.dumps(r) if args.json else table(r, args.topology), flush=True)
    except ConfigError as e:
        print(f"mmjax plan: {e}", file=sys.stderr)
        return 2
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plan", help="per-device memory and FLOPs of the train step, for N devices or a TPU slice"
    )
    p.add_argument("--config", required=True, help="configs/NAME.py[:VARIANT]")
    p.add_argument(
        "--devices", type=int, default=0, help="fake CPU devices (default 1), or the slice's chip count"
    )
    p.add_argument(
        "--topology", default="", help="a TPU slice to compile for without one, e.g. v5e:4x4, v5p:2x2x2"
    )
    p.add_argument(
        "--memory-gb",
        type=float,
        default=0.0,
        help="per-device memory (GiB) to fit: tries larger fsdp sizes, stronger remat policies, then "
        "gradient accumulation, and reports the first whose peak fits",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per stage instead of the table")
