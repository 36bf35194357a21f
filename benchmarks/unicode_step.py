"""UniCode stage-1 tokenizer train-step throughput: codebook modes and stacked-quantization depths.

  python benchmarks/unicode_step.py                     # every variant, 3 rounds of 5 step pairs
  python benchmarks/unicode_step.py --only tiny --reps 5 --wait-quiet 30

Each variant is a Trainer on `configs/unicode.py:tiny_stage1` with overrides: its step is compiled
once and called on one fixed on-device batch after a warm-up of 2 steps (the first fixes the
code -> token-id map). Every pair of steps is timed on its own (blocked on), the variants
interleaved over `--reps` rounds; ms/step is the median over all timed pairs (per step), a ratio
the median of per-round ratios (each round's median pair), so load that comes and goes hits both
sides of a ratio alike.

- modes, at two sizes: `language` (EMA statistics, update, dead-code restarts and the blend toward
  the LLM rows every step), `frozen` (the LLM rows), `dual` (even steps: the tokenizer with a codebook
  loss into the table; odd steps: the LLM's caption loss; a `lax.cond` on the step's parity runs one).
  Steps are timed in pairs (an even and an odd one), so a dual figure is the mean of both halves.
  tiny = the config as shipped (32 px, block_out_channels (32,64,64), D = 2 concat, LLM width 128,
  256 codes); medium = 64 px, (64,128,128), LLM width 256 / depth 2 / vocab 2048, 1024 codes.
- depth, at the tiny size, language mode: D = 1, 2, 4 codes per position, 'concat' (D slices of the
  features, D x E channels) vs 'cumsum' (residual, E channels, D sequential lookups).
"""

from __future__ import annotations

import common

CONFIG = "configs/unicode.py:tiny_stage1"
SMALL_DATA = ["data.components.images.num_records=256", "evals={}"]
MEDIUM = [
    "data.image_size=64",
    "model.vq.block_out_channels=(64,128,128)",
    "model.vq.latent_channels=64",
    "model.llm.width=256",
    "model.llm.depth=2",
    "model.llm.num_heads=4",
    "model.llm.num_kv_heads=2",
    "model.llm.mlp_dim=512",
    "model.llm.vocab_size=2048",
    "model.num_codes=1024",
]
MODES = ("language", "frozen", "dual")
DEPTHS = (1, 2, 4)
AGGREGATES = ("concat", "cumsum")


def variants() -> dict[str, dict]:
    out = {}
    for size, extra in (("tiny", []), ("medium", MEDIUM)):
        for mode in MODES:
            out[f"{size}/{mode}"] = dict(
                group="modes", size=size, mode=mode, overrides=[*extra, f"model.codebook.mode={mode}"]
            )
    for agg in AGGREGATES:
        for d in DEPTHS:
            name = "tiny/language" if (d, agg) == (2, "concat") else f"tiny/D{d}_{agg}"
            out.setdefault(
                name,
                dict(
                    overrides=[
                        f"model.vq.depth={d}",
                        f"model.vq.aggregate={agg}",
                        "model.codebook.mode=language",
                    ]
                ),
            )
            out[name].update(depth=d, aggregate=agg)
    return out


def main():
    p = common.parser(__doc__)
    p.add_argument("--steps", type=int, default=5, help="timed step pairs per variant per round")
    p.add_argument("--only", default="", help="comma list of name prefixes (tiny, medium, tiny/D4, ...)")
    args = p.parse_args()
    common.setup()
    import time

    import jax

    from mmjax import config as config_lib, parallel, tree
    from mmjax.data import pipeline
    from mmjax.train import trainer as trainer_lib

    specs = variants()
    if args.only:
        keep = tuple(args.only.split(","))
        specs = {k: v for k, v in specs.items() if k.startswith(keep)}
    runs = {}
    for name, spec in specs.items():
        cfg = config_lib.load(f"{common.ROOT}/{CONFIG}", [*SMALL_DATA, *spec["overrides"]])
        t = trainer_lib.Trainer(cfg, common.tempdir("unicode_step_"))
        local = pipeline.first_batch(pipeline.train_dataset(cfg, t.recipe.preprocess))
        batch = parallel.global_batch(local, t.batch_sharding)
        t0 = time.perf_counter()
        step = t.compile_step(t.abstract_batch(local))
        compile_s = time.perf_counter() - t0
        _, _, state = common.bare_step(step, t.init_state(), batch, 2)  # warm-up
        flat = tree.flat(t.abstract_params)
        runs[name] = dict(
            spec,
            step=step,
            state=state,
            batch=batch,
            times=[],
            rounds=[],
            size=cfg.data.global_batch_size,
            image_size=cfg.data.image_size,
            params=t.num_params,
            trainable=sum(flat[n].size for n in t.opt.trainable),
            compile_s=compile_s,
        )
        print(f"{name}: compiled in {compile_s:.1f} s, {t.num_params:,} parameters", flush=True)
    monitor = common.quiet(args.wait_quiet)
    for r in range(args.reps):
        for run in runs.values():
            times = []
            for _ in range(args.steps):
                sec, _, run["state"] = common.bare_step(run["step"], run["state"], run["batch"], 2)
                times.append(sec)
            run["times"] += times
            run["rounds"].append(common.median(times))
        print(
            f"round {r + 1}: " + ", ".join(f"{n} {1e3 * v['rounds'][-1]:.1f}" for n, v in runs.items()),
            flush=True,
        )

    def ratio(a, b):
        if a not in runs or b not in runs:
            return None
        return common.median([x / y for x, y in zip(runs[a]["rounds"], runs[b]["rounds"])])

    rows = {}
    for name, run in runs.items():
        ms = 1e3 * common.median(run["times"])
        rows[name] = {
            "variant": name,
            "image_px": run["image_size"],
            "params": run["params"],
            "trainable": run["trainable"],
            "ms_per_step": ms,
            "range_ms": common.spread([1e3 * x for x in run["rounds"]]),
            "images_per_s": run["size"] / (ms / 1e3),
            "compile_s": run["compile_s"],
        }
    mode_rows = []
    for size in ("tiny", "medium"):
        for mode in MODES:
            name = f"{size}/{mode}"
            if name in rows:
                mode_rows.append(
                    {**rows[name], "size": size, "mode": mode, "/ frozen": ratio(name, f"{size}/frozen")}
                )
    depth_rows = []
    for agg in AGGREGATES:
        for d in DEPTHS:
            name = next(
                (n for n, v in runs.items() if v.get("depth") == d and v.get("aggregate") == agg), None
            )
            if name is None:
                continue
            d1 = next(n for n, v in runs.items() if v.get("depth") == 1 and v.get("aggregate") == agg)
            concat = next(
                (n for n, v in runs.items() if v.get("depth") == d and v.get("aggregate") == "concat"), None
            )
            depth_rows.append(
                {
                    **rows[name],
                    "D": d,
                    "aggregate": agg,
                    "/ D=1": ratio(name, d1),
                    "/ concat": ratio(name, concat),
                }
            )
    cols = ["variant", "image_px", "params", "trainable", "ms_per_step", "range_ms", "images_per_s"]
    print(f"jax {jax.__version__}, devices {jax.device_count()}, batch {next(iter(runs.values()))['size']}")
    common.report(
        "unicode_step",
        monitor,
        [
            ("codebook modes (stage 1)", mode_rows, [*cols, "/ frozen", "compile_s"]),
            ("depth and aggregation (tiny, language)", depth_rows, [*cols, "/ D=1", "/ concat", "compile_s"]),
        ],
        {
            "modes": mode_rows,
            "depths": depth_rows,
            "raw_s": {n: v["times"] for n, v in runs.items()},
        },
    )


if __name__ == "__main__":
    main()
