"""CPU train-step throughput of the mmjax LLM and ViT against the same architectures in PyTorch.

  python benchmarks/model_throughput.py                            # llm + vit, every variant, 5 rounds
  python benchmarks/model_throughput.py --models llm --jax unrolled --torch eager --rounds 3
  python benchmarks/model_throughput.py --jax unrolled --torch fused --rounds 1 --profile   # op tables
  XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=dot python benchmarks/model_throughput.py --jax unrolled

The PyTorch side is transformers' LlamaForCausalLM / CLIPVisionModel built from a config with
random weights; the mmjax side is built from the same HF config and the same weights by
`mmjax.interop.hf_llm` / `hf_vision`, and the script checks that both compute the same first loss.
A train step is forward + backward + AdamW (torch defaults: lr 1e-4, betas .9/.999, eps 1e-8,
weight decay 0.01) in float32 on one fixed batch:

  llm  next-token cross-entropy (HF's `labels=` loss; mmjax: targets shifted in the batch, last
       position weighted 0, as HF computes it), tokens/s = batch * seq / step time
  vit  mean squared error of every output token (last_hidden_state) against a fixed random
       target, so no layer's work is dead code; images/s = batch / step time

Variants (all built in one process, then measured interleaved: each round runs `--steps` steps
of every variant in turn, after `--warmup` untimed steps each, which include jit / torch.compile):

  jax    unrolled  scan=False, jitted step donating its state (as the trainer does)
         scan      scan=True (nn.scan over layers), donating
         nodonate  scan=False, no donation
  torch  eager     torch.optim.AdamW() defaults (for-loop update on CPU)
         fused     AdamW(fused=True)
         compile   torch.compile(model) + fused AdamW

Load: before each measurement the script waits (--wait-quiet, default 60 s) for other processes
to use < 0.2 cores, and repeats a measurement (at most --retries times) while other processes
used more than --max-other cores during it; `other_cores` gives median, max and the number of
runs it took. (On a 2-core machine, one busy process beside PyTorch's two OpenMP threads slows a
torch step 4-5x and an XLA step ~2x, so loaded measurements would favour JAX.)

Both frameworks get the same cores: torch.set_num_threads(--threads); XLA's CPU client uses one
intra-op thread per core (see `cores` in the table: CPU seconds per wall second during the
measurement). XLA flags are process-wide, so each flag setting is one run of this script with
XLA_FLAGS set; the ratio is always against torch measured in the same process.
"""

from __future__ import annotations

import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common

LLM = dict(  # LlamaConfig: GQA, SwiGLU, RoPE
    vocab_size=8192,
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
VIT = dict(  # CLIPVisionConfig (quick_gelu, pre-LN, class token)
    image_size=224,
    patch_size=16,
    hidden_size=384,
    intermediate_size=1536,
    num_hidden_layers=6,
    num_attention_heads=6,
)
SEQ, LLM_BATCH, VIT_BATCH = 256, 8, 16
JAX = {"unrolled": dict(scan=False, donate=True), "scan": dict(scan=True, donate=True)}
JAX["nodonate"] = dict(scan=False, donate=False)
TORCH = ("eager", "fused", "compile")


def build(kind: str, seed: int = 0):
    """(torch model, HF config dict, mmjax params (unscanned numpy), mmjax kwargs, batch of numpy arrays)."""
    import numpy as np
    import torch
    import transformers as tr

    from mmjax.interop import hf_llm, hf_vision

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    if kind == "llm":
        model = tr.LlamaForCausalLM(tr.LlamaConfig(**LLM))
        tokens = rng.integers(0, LLM["vocab_size"], (LLM_BATCH, SEQ)).astype(np.int32)
        # targets shifted in the data, as HF's loss and mmjax's MM1 recipe do (no logits slicing)
        targets = np.concatenate([tokens[:, 1:], np.zeros_like(tokens[:, :1])], axis=1)
        weights = np.ones(tokens.shape, np.float32)
        weights[:, -1] = 0
        batch = {"tokens": tokens, "targets": targets, "weights": weights}
    else:
        model = tr.CLIPVisionModel(tr.CLIPVisionConfig(**VIT))
        n = (VIT["image_size"] // VIT["patch_size"]) ** 2 + 1
        s = VIT["image_size"]
        batch = {
            "images": rng.normal(size=(VIT_BATCH, s, s, 3)).astype(np.float32),
            "target": rng.normal(size=(VIT_BATCH, n, VIT["hidden_size"])).astype(np.float32),
        }
    hf_config = model.config.to_dict()
    tensors = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    convert = hf_llm if kind == "llm" else hf_vision
    params, meta = convert.to_mmjax(hf_config, tensors)
    return model.train(), hf_config, params, meta["model"], batch


def torch_step(kind: str, model, batch: dict, variant: str):
    """A function running one torch train step and returning the loss (a float)."""
    import torch

    model = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True if variant != "eager" else None)
    if variant == "compile":
        model = torch.compile(model)
    if kind == "llm":
        x = torch.from_numpy(batch["tokens"]).long()
        loss_fn = lambda: model(input_ids=x, labels=x).loss  # noqa: E731
    else:
        x = torch.from_numpy(batch["images"].transpose(0, 3, 1, 2).copy())
        y = torch.from_numpy(batch["target"])
        loss_fn = lambda: ((model(pixel_values=x).last_hidden_state - y) ** 2).mean()  # noqa: E731

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
        return loss.item()

    return step


def jax_step(kind: str, params, model_kw: dict, batch: dict, scan: bool, donate: bool):
    """A function running one jitted mmjax train step and returning the loss (a float)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from mmjax.models.llm import LLM, stack_layers
    from mmjax.models.vit import ViT

    if kind == "llm":
        model = LLM(**model_kw, scan=scan)
        params = stack_layers(params, model.depth) if scan else params

        def loss_fn(p, b):
            logits, _ = model.apply({"params": p}, b["tokens"])
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, b["targets"])
            return (ce * b["weights"]).sum() / b["weights"].sum()

    else:
        model = ViT(**model_kw, scan=scan)
        if scan:
            blocks = [params["encoder"][f"block_{i}"] for i in range(model.depth)]
            params = {**params, "encoder": {"blocks": jax.tree.map(lambda *xs: np.stack(xs), *blocks)}}

        def loss_fn(p, b):
            tokens = model.apply({"params": p}, b["images"])[1]["tokens"]
            return jnp.mean((tokens - b["target"]) ** 2)

    tx = optax.adamw(1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)

    def train_step(state, b):
        p, opt = state
        loss, grads = jax.value_and_grad(loss_fn)(p, b)
        updates, opt = tx.update(grads, opt, p)
        return (optax.apply_updates(p, updates), opt), loss

    fn = jax.jit(train_step, donate_argnums=(0,) if donate else ())
    params = jax.tree.map(jnp.asarray, params)
    state = [(params, tx.init(params))]
    b = jax.device_put(batch)

    def step():
        state[0], loss = fn(state[0], b)
        return float(loss)  # blocks: the step is done

    step.hlo = lambda: fn.lower(state[0], b).compile().as_text()
    return step


def profile(framework: str, step, top: int = 10) -> list[tuple[str, list[dict], list[str]]]:
    """One profiled step: tables of op time (XLA: by kind, then the top ops with the jax op that
    made each; torch: the top aten ops by self CPU time). XLA runs independent ops concurrently,
    so its op times can add up to more than the step."""
    import collections
    import glob
    import gzip
    import json
    import re

    if framework == "torch":
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        rows = [{"op": e.key[:60], "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3} for e in events]
        return [
            ("torch ops, one step (self ms on the calling thread):", rows[:top], ["op", "calls", "self_ms"])
        ]
    import jax

    meta = {}  # HLO instruction -> (shape, jax op name)
    for m in re.finditer(r'^\s*%(\S+) = (\S+) .*?op_name="([^"]*)"', step.hlo(), re.M):
        meta[m.group(1)] = (m.group(2), m.group(3).removeprefix("jit(train_step)/"))
    trace_dir = common.tempdir("mmjax_bench_trace_")
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        step()
    (path,) = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
    ms = collections.Counter()
    for e in json.load(gzip.open(path))["traceEvents"]:
        if e.get("ph") == "X" and e["name"] in meta:
            ms[e["name"]] += e.get("dur", 0) / 1e3
    kinds = collections.Counter()
    for name, t in ms.items():
        op = meta[name][1]
        kinds[
            "dot"
            if "dot_general" in op
            else "copy/transpose"
            if name.startswith(("copy", "transpose"))
            else "other"
        ] += t
    by_kind = [{"kind": k, "ms": t} for k, t in kinds.most_common()] + [
        {"kind": "all", "ms": sum(kinds.values())}
    ]
    ops = [
        {"op": n, "ms": t, "shape": meta[n][0], "jax_op": meta[n][1][-70:]} for n, t in ms.most_common(top)
    ]
    return [
        ("XLA op time by kind, one step (ms):", by_kind, ["kind", "ms"]),
        ("top XLA ops (ms):", ops, ["op", "ms", "shape", "jax_op"]),
    ]


def measure(fn, args) -> tuple[float, float, float, int]:
    """Times fn() after waiting for a quiet machine; while other processes used more than
    --max-other cores during it, waits and runs it again (at most --retries times).
    Returns (seconds, our cores, other cores, tries)."""
    for tries in range(1, args.retries + 2):
        block = common.quiet(args.wait_quiet)
        t0, own0 = time.perf_counter(), common.own_seconds()
        fn()
        sec = time.perf_counter() - t0
        other = block.summary()["other_cores"]
        if other <= args.max_other:
            break
    return sec, (common.own_seconds() - own0) / sec, other, tries


def add_load_options(parser):
    parser.add_argument("--max-other", type=float, default=0.2, help="re-measure above this other load")
    parser.add_argument("--retries", type=int, default=3, help="re-measurements at most, per measurement")
    parser.set_defaults(wait_quiet=60.0)


def main():
    parser = common.parser(__doc__)
    parser.add_argument("--models", default="llm,vit")
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
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    monitor = common.CpuMonitor()
    runs, rows, first_loss, warm_s = {}, [], {}, {}
    for kind in args.models.split(","):
        model, _, params, model_kw, batch = build(kind)
        steps = {}
        for v in filter(None, args.jax.split(",")):
            steps[("jax", v)] = jax_step(kind, params, model_kw, batch, **JAX[v])
        for v in filter(None, args.torch.split(",")):
            steps[("torch", v)] = torch_step(kind, model, batch, v)
        for key, step in steps.items():  # warm-up: compile, first allocations
            t0 = time.perf_counter()
            first_loss[(kind, *key)] = step()
            for _ in range(args.warmup - 1):
                step()
            warm_s[(kind, *key)] = time.perf_counter() - t0
            print(
                f"{kind} {key[0]} {key[1]}: first loss {first_loss[(kind, *key)]:.6f}, warm-up "
                f"{warm_s[(kind, *key)]:.1f} s",
                flush=True,
            )
        for r in range(args.rounds):
            keys = list(steps)
            keys = keys[r % len(keys) :] + keys[: r % len(keys)]  # rotate the order every round
            for key in keys:
                sec, cores, other, tries = measure(lambda: [steps[key]() for _ in range(args.steps)], args)
                run = {"step_s": sec / args.steps, "cores": cores, "other": other, "tries": tries}
                runs.setdefault((kind, *key), []).append(run)
                print(
                    f"round {r} {kind} {key[0]} {key[1]}: {run['step_s']:.3f} s/step, {cores:.2f} cores, "
                    f"other load {other:.2f} (try {tries})",
                    flush=True,
                )
        per_step = LLM_BATCH * SEQ if kind == "llm" else VIT_BATCH
        unit = "tokens/s" if kind == "llm" else "images/s"
        ref = [runs[(kind, "torch", v)] for v in TORCH if (kind, "torch", v) in runs]
        for key in steps:
            rs = runs[(kind, *key)]
            row = {"model": kind, "framework": key[0], "variant": key[1], "unit": unit}
            row |= {"step_s": common.median([r["step_s"] for r in rs])}
            row["throughput"] = per_step / row["step_s"]
            row["range"] = common.spread([per_step / r["step_s"] for r in rs])
            row["cores"] = common.median([r["cores"] for r in rs])
            other = [r["other"] for r in rs]
            row["other_cores"] = (
                f"{common.median(other):.2f} (max {max(other):.2f}, {sum(r['tries'] for r in rs)} runs)"
            )
            row["first_loss"] = f"{first_loss[(kind, *key)]:.6f}"
            row["warmup_s"] = warm_s[(kind, *key)]
            for name, tr_runs in zip([v for v in TORCH if (kind, "torch", v) in runs], ref):
                # median over rounds of (this variant's throughput / that torch variant's, same round)
                row[f"vs_torch_{name}"] = common.median(
                    [t["step_s"] / m["step_s"] for m, t in zip(rs, tr_runs)]
                )
            rows.append(row)
        losses = [first_loss[(kind, *k)] for k in steps]
        print(f"{kind}: first-step losses agree to {max(losses) - min(losses):.2e}", flush=True)
        if args.profile:
            for (framework, variant), step in steps.items():
                for title, prof_rows, prof_cols in profile(framework, step):
                    print(
                        f"\n{kind} {framework} {variant}: {title}\n{common.markdown_table(prof_rows, prof_cols)}"
                    )

    ratio_cols = [f"vs_torch_{v}" for v in TORCH if any(f"vs_torch_{v}" in r for r in rows)]
    cols = ["model", "framework", "variant", "step_s", "throughput", "unit", "range", *ratio_cols]
    cols += ["cores", "warmup_s", "first_loss", "other_cores"]
    sizes = {"llm": {**LLM, "seq": SEQ, "batch": LLM_BATCH}, "vit": {**VIT, "batch": VIT_BATCH}}
    info = {
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    print(f"\n{info}")
    common.report(
        "model_throughput",
        monitor,
        [("train-step throughput (medians over rounds; vs_torch_X = median per-round ratio):", rows, cols)],
        {**info, "sizes": sizes, "rows": rows, "raw": {"/".join(k): v for k, v in runs.items()}},
    )


if __name__ == "__main__":
    main()
