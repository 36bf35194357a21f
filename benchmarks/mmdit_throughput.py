"""CPU train-step throughput of the mmjax MM-DiT against diffusers' FluxTransformer2DModel (PyTorch).

  python benchmarks/mmdit_throughput.py                      # small + medium, every variant, 5 rounds
  python benchmarks/mmdit_throughput.py --shapes small --rounds 3 --torch fused,compile
  python benchmarks/mmdit_throughput.py --shapes small --rounds 1 --profile   # op tables

The PyTorch side is diffusers' `FluxTransformer2DModel` built from a config with random weights; the
mmjax side is `MMDiT` built from the same config and the same weights by
`mmjax.interop.diffusers_flux.to_mmjax` (the two forwards agree to ~1e-5, tests/test_mmdit.py), and
the script checks that both compute the same first loss. A train step is forward + backward + AdamW
(lr 1e-4, betas .9/.999, eps 1e-8, weight decay 0.01) in float32 on one fixed batch: flow-matching
shaped, loss = mean squared error of the predicted velocity against a fixed random target, inputs
= packed latent tokens (row-major, [B, h*w, C] for diffusers, [B, h, w, C] for mmjax), condition
tokens, pooled vector, t in [0, 1] (FLUX multiplies by 1000 inside, as mmjax), img_ids (0, row, col)
and zero txt_ids. examples/s = batch / step time.

Variants (all built in one process, then measured interleaved, as benchmarks/model_throughput.py):
  jax    unrolled  scan=False, jitted step donating its state;   scan  scan=True (double and single
         blocks scanned separately), donating
  torch  eager     torch.optim.AdamW() defaults;   fused  AdamW(fused=True);
         compile   torch.compile(model) + fused AdamW
Both frameworks get the same cores: torch.set_num_threads(--threads); XLA's CPU client uses one
intra-op thread per core. Load handling (--wait-quiet, --max-other, --retries) as model_throughput.
"""

from __future__ import annotations

import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common
from model_throughput import add_load_options, measure, profile

SHAPES = {  # FluxTransformer2DModel kwargs + batch / grid / condition length
    "small": dict(
        flux=dict(
            in_channels=16,
            num_layers=2,
            num_single_layers=4,
            attention_head_dim=64,
            num_attention_heads=4,
            joint_attention_dim=256,
            pooled_projection_dim=128,
            axes_dims_rope=(16, 24, 24),
        ),
        batch=4,
        grid=(16, 16),
        cond_len=32,
    ),
    "medium": dict(
        flux=dict(
            in_channels=16,
            num_layers=2,
            num_single_layers=4,
            attention_head_dim=64,
            num_attention_heads=8,
            joint_attention_dim=512,
            pooled_projection_dim=256,
            axes_dims_rope=(16, 24, 24),
        ),
        batch=4,
        grid=(16, 16),
        cond_len=64,
    ),
}
JAX = {"unrolled": dict(scan=False), "scan": dict(scan=True)}
TORCH = ("eager", "fused", "compile")


def build(shape: str, seed: int = 0):
    """(torch model, mmjax params (unscanned numpy), MMDiT kwargs, batch of numpy arrays)."""
    import numpy as np
    import torch
    from diffusers import FluxTransformer2DModel

    from mmjax.interop import diffusers_flux

    s = SHAPES[shape]
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**s["flux"])
    rng = np.random.default_rng(seed)
    (h, w), B, C = s["grid"], s["batch"], s["flux"]["in_channels"]
    ids = np.zeros((h, w, 3), np.float32)
    ids[..., 1], ids[..., 2] = np.arange(h)[:, None], np.arange(w)[None]
    batch = {
        "x": rng.normal(size=(B, h, w, C)).astype(np.float32),
        "t": rng.uniform(size=(B,)).astype(np.float32),
        "cond": rng.normal(size=(B, s["cond_len"], s["flux"]["joint_attention_dim"])).astype(np.float32),
        "pooled": rng.normal(size=(B, s["flux"]["pooled_projection_dim"])).astype(np.float32),
        "target": rng.normal(size=(B, h, w, C)).astype(np.float32),
        "img_ids": ids.reshape(-1, 3),
    }
    tensors = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    params, kw = diffusers_flux.to_mmjax(dict(model.config), tensors)
    n_params = sum(v.size for v in tensors.values())
    return model.train(), params, kw, batch, n_params


def torch_step(model, batch: dict, variant: str):
    """A function running one torch train step and returning the loss (a float)."""
    import torch

    model = copy.deepcopy(model)
    opt = torch.optim.AdamW(
        model.parameters(), lr=1e-4, weight_decay=0.01, fused=True if variant != "eager" else None
    )
    fwd = torch.compile(model) if variant == "compile" else model
    B, h, w, C = batch["x"].shape
    x = torch.from_numpy(batch["x"].reshape(B, h * w, C))
    target = torch.from_numpy(batch["target"].reshape(B, h * w, C))
    inputs = dict(
        hidden_states=x,
        encoder_hidden_states=torch.from_numpy(batch["cond"]),
        pooled_projections=torch.from_numpy(batch["pooled"]),
        timestep=torch.from_numpy(batch["t"]),
        img_ids=torch.from_numpy(batch["img_ids"]),
        txt_ids=torch.zeros(batch["cond"].shape[1], 3),
    )

    def step():
        opt.zero_grad(set_to_none=True)
        loss = ((fwd(**inputs).sample - target) ** 2).mean()
        loss.backward()
        opt.step()
        return loss.item()

    return step


def jax_step(params, model_kw: dict, batch: dict, scan: bool):
    """A function running one jitted (state-donating) mmjax train step and returning the loss."""
    import jax
    import jax.numpy as jnp
    import optax

    from mmjax.models.mmdit import MMDiT, stack_blocks

    model = MMDiT(**model_kw, scan=scan)
    params = stack_blocks(params) if scan else params
    b = jax.device_put({k: v for k, v in batch.items() if k != "img_ids"})

    def loss_fn(p, b):
        v = model.apply({"params": p}, b["x"], b["t"], b["cond"], None, b["pooled"])
        return jnp.mean((v - b["target"]) ** 2)

    tx = optax.adamw(1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)

    def train_step(state, b):
        p, opt = state
        loss, grads = jax.value_and_grad(loss_fn)(p, b)
        updates, opt = tx.update(grads, opt, p)
        return (optax.apply_updates(p, updates), opt), loss

    fn = jax.jit(train_step, donate_argnums=(0,))
    params = jax.tree.map(jnp.asarray, params)
    state = [(params, tx.init(params))]

    def step():
        state[0], loss = fn(state[0], b)
        return float(loss)  # blocks: the step is done

    step.hlo = lambda: fn.lower(state[0], b).compile().as_text()
    return step


def main():
    parser = common.parser(__doc__)
    parser.add_argument("--shapes", default="small,medium", help="comma list of " + ",".join(SHAPES))
    parser.add_argument("--jax", default=",".join(JAX), help="comma list of " + ",".join(JAX))
    parser.add_argument("--torch", default=",".join(TORCH), help="comma list of " + ",".join(TORCH))
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--profile", action="store_true", help="then profile one step of each variant")
    add_load_options(parser)
    args = parser.parse_args()

    common.setup()
    import diffusers
    import torch

    torch.set_num_threads(args.threads)
    monitor = common.CpuMonitor()
    runs, rows, first_loss, warm_s, sizes = {}, [], {}, {}, {}
    torch_variants = [v for v in args.torch.split(",") if v]
    for shape in args.shapes.split(","):
        model, params, kw, batch, n_params = build(shape)
        sizes[shape] = {**SHAPES[shape], "width": kw["width"], "params": n_params}
        steps = {("jax", v): jax_step(params, kw, batch, **JAX[v]) for v in args.jax.split(",") if v}
        steps |= {("torch", v): torch_step(model, batch, v) for v in torch_variants}
        for key, step in steps.items():  # warm-up: compile, first allocations
            t0 = time.perf_counter()
            first_loss[(shape, *key)] = step()
            for _ in range(args.warmup - 1):
                step()
            warm_s[(shape, *key)] = time.perf_counter() - t0
            print(
                f"{shape} {key[0]} {key[1]}: first loss {first_loss[(shape, *key)]:.6f}, warm-up "
                f"{warm_s[(shape, *key)]:.1f} s",
                flush=True,
            )
        for r in range(args.rounds):
            keys = list(steps)
            keys = keys[r % len(keys) :] + keys[: r % len(keys)]  # rotate the order every round
            for key in keys:
                sec, cores, other, tries = measure(lambda: [steps[key]() for _ in range(args.steps)], args)
                run = {"step_s": sec / args.steps, "cores": cores, "other": other, "tries": tries}
                runs.setdefault((shape, *key), []).append(run)
                print(
                    f"round {r} {shape} {key[0]} {key[1]}: {run['step_s']:.3f} s/step, {cores:.2f} cores, "
                    f"other load {other:.2f} (try {tries})",
                    flush=True,
                )
        per_step = SHAPES[shape]["batch"]
        ref = {v: runs[(shape, "torch", v)] for v in torch_variants}
        for key in steps:
            rs = runs[(shape, *key)]
            row = {"shape": shape, "framework": key[0], "variant": key[1]}
            row |= {"step_s": common.median([r["step_s"] for r in rs])}
            row["examples_per_s"] = per_step / row["step_s"]
            row["range"] = common.spread([per_step / r["step_s"] for r in rs])
            row["cores"] = common.median([r["cores"] for r in rs])
            other = [r["other"] for r in rs]
            row["other_cores"] = (
                f"{common.median(other):.2f} (max {max(other):.2f}, {sum(r['tries'] for r in rs)} runs)"
            )
            row["first_loss"] = f"{first_loss[(shape, *key)]:.6f}"
            row["warmup_s"] = warm_s[(shape, *key)]
            for name, tr_runs in ref.items():
                # median over rounds of (this variant's throughput / that torch variant's, same round)
                row[f"vs_torch_{name}"] = common.median(
                    [t["step_s"] / m["step_s"] for m, t in zip(rs, tr_runs)]
                )
            rows.append(row)
        losses = [first_loss[(shape, *k)] for k in steps]
        print(f"{shape}: first-step losses agree to {max(losses) - min(losses):.2e}", flush=True)
        if args.profile:
            for (framework, variant), step in steps.items():
                for title, prof_rows, prof_cols in profile(framework, step):
                    print(
                        f"\n{shape} {framework} {variant}: {title}\n{common.markdown_table(prof_rows, prof_cols)}"
                    )

    ratio_cols = [f"vs_torch_{v}" for v in torch_variants]
    cols = ["shape", "framework", "variant", "step_s", "examples_per_s", "range", *ratio_cols]
    cols += ["cores", "warmup_s", "first_loss", "other_cores"]
    info = {
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    print(f"\n{info}")
    common.report(
        "mmdit_throughput",
        monitor,
        [("train-step throughput (medians over rounds; vs_torch_X = median per-round ratio):", rows, cols)],
        {**info, "sizes": sizes, "rows": rows, "raw": {"/".join(k): v for k, v in runs.items()}},
    )


if __name__ == "__main__":
    main()
