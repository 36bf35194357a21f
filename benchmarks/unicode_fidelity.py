"""UniCode's fidelity study (RESULTS.md) on configs/unicode.py:tiny, every arm at equal steps:
  language | frozen | dual   the pipeline (stage 1 in that codebook mode, then stage 2 from it)
  no_decompress              stage 2 without the decompression component, from language's stage 1
  d1_concat, d2_cumsum,      stage 1 only (language mode) with D codes per position aggregated by
  d4_concat, d4_cumsum       concatenation or cumulative sum (d2_concat is language's stage 1;
                             D = 1 is the same quantizer either way)
Stage 1 reports reconstruction PSNR, codebook usage, perplexity and the codebook-LLM cosine;
stage 2 VQA accuracy (and the image-blind prior), GenEval overall and single-object.

  python benchmarks/unicode_fidelity.py --workdir /tmp/uc_fid --steps 120 --stage2-steps 160 --seeds 0,1
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import sys

import common

CONFIG = os.path.join(common.ROOT, "configs", "unicode.py")
MODES = ("language", "frozen", "dual")
DEPTHS = {
    "d1_concat": (1, "concat"),
    "d2_cumsum": (2, "cumsum"),
    "d4_concat": (4, "concat"),
    "d4_cumsum": (4, "cumsum"),
}
STAGE1 = {
    "reconstruct/psnr": "PSNR (dB)",
    "reconstruct/usage": "usage",
    "reconstruct/perplexity": "perplexity",
    "reconstruct/codebook_llm_cosine": "codebook-LLM cosine",
}
STAGE2 = {
    "vqa/accuracy": "VQA acc.",
    "vqa/prior": "VQA prior",
    "geneval/overall": "GenEval overall",
    "geneval/single_object": "GenEval single object",
}
EVALS = ["evals.reconstruct.num_examples=256", "evals.reconstruct.batch_size=64"]
EVALS2 = EVALS + ["evals.vqa.num_examples=256", "evals.vqa.batch_size=64"]


def run_one(arm: str, seed: int, steps: int, steps2: int, workdir: str) -> dict:
    """One arm and seed, trained and evaluated; {stage: final float metrics}."""
    common.setup()
    from mmjax import config as config_lib
    from mmjax.train import stages

    one = [f"seed={seed}", f"train.steps={steps}", "train.save_every=0", *EVALS]
    two = [f"seed={seed}", f"train.steps={steps2}", "train.save_every=0", *EVALS2]
    if arm in DEPTHS:
        D, agg = DEPTHS[arm]
        cfg = config_lib.load(
            f"{CONFIG}:tiny_stage1", [*one, f"model.vq.depth={D}", f"model.vq.aggregate={agg}"]
        )
        parts = {"stage1": cfg}
    elif arm == "no_decompress":
        export = os.path.join(os.path.dirname(workdir), f"language_seed{seed}", "stage1", "export")
        cfg = config_lib.load(f"{CONFIG}:tiny_stage2", [*two, f"init.unicode.path={export}"])
        with cfg.unlocked():
            del cfg.data.components["decompress"]
        parts = {"stage2": cfg}
    else:
        over = [f"stage1.{o}" for o in one] + [f"stage2.{o}" for o in two]
        cfg = config_lib.load(f"{CONFIG}:tiny", [*over, f"stage1.model.codebook.mode={arm}"])
        return {k: floats(v) for k, v in stages.train(cfg, workdir).items()}
    from mmjax.train import trainer

    ((name, cfg),) = parts.items()
    return {name: floats(trainer.train(cfg, os.path.join(workdir, name)))}


def floats(results: dict) -> dict:
    return {k: v for k, v in results.items() if isinstance(v, float)}


def cell(values: list[float]) -> str:
    """mean (seed values)."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ({', '.join(f'{v:.3f}' for v in values)})"


def tables(runs: dict, seeds: list[str]):
    def values(arm, stage, key):
        return [runs[f"{arm}_seed{s}"][stage][key] for s in seeds if stage in runs.get(f"{arm}_seed{s}", {})]

    modes = [
        {
            "arm": a,
            **{t: cell(values(a, "stage1", k)) for k, t in STAGE1.items()},
            **{t: cell(values(a, "stage2", k)) for k, t in STAGE2.items()},
        }
        for a in (*MODES, "no_decompress")
    ]
    arms = {"d1_concat": "d1_concat", "d2_concat": "language", **{a: a for a in DEPTHS if a != "d1_concat"}}
    depth = [
        {"D, aggregate": label, **{t: cell(values(a, "stage1", k)) for k, t in STAGE1.items()}}
        for label, a in arms.items()
    ]
    s = ", ".join(seeds)
    return [
        (
            f"codebook modes and decompression, mean (seeds {s})",
            modes,
            ["arm", *STAGE1.values(), *STAGE2.values()],
        ),
        (
            f"stacked quantization (language mode, stage 1), mean (seeds {s})",
            depth,
            ["D, aggregate", *STAGE1.values()],
        ),
    ]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="kept: a rerun skips the runs already finished")
    p.add_argument("--steps", type=int, default=120, help="stage 1 steps")
    p.add_argument("--stage2-steps", type=int, default=160)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (each in its own process)")
    p.add_argument("--run-one", default="", help="internal: ARM,SEED (one run, in this process)")
    args = p.parse_args()
    if args.run_one:
        arm, seed = args.run_one.split(",")
        out = os.path.join(args.workdir, f"{arm}_seed{seed}")
        os.makedirs(out, exist_ok=True)
        results = run_one(arm, int(seed), args.steps, args.stage2_steps, out)
        with open(os.path.join(out, "fidelity.json"), "w") as f:
            json.dump(results, f, indent=1)
        return
    os.makedirs(args.workdir, exist_ok=True)
    seeds = args.seeds.split(",")

    def run(name):
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--workdir",
            args.workdir,
            "--steps",
            str(args.steps),
        ]
        cmd += ["--stage2-steps", str(args.stage2_steps), "--run-one", name.replace("_seed", ",")]
        return common.cached_run(cmd, os.path.join(args.workdir, name, "fidelity.json"))

    monitor, runs = common.CpuMonitor(), {}
    first = [f"{a}_seed{s}" for s in seeds for a in (*MODES, *DEPTHS)]
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        for names in (first, [f"no_decompress_seed{s}" for s in seeds]):  # the second needs language's
            for name, res in zip(names, pool.map(run, names)):
                runs[name] = res
                print(json.dumps({"run": name, **res}), flush=True)
    seconds = {n: r.pop("seconds", None) for n, r in runs.items()}
    payload = {"runs": runs, "seconds": seconds, "steps": args.steps, "stage2_steps": args.stage2_steps}
    with open(os.path.join(args.workdir, "unicode_fidelity.json"), "w") as f:
        json.dump(payload, f, indent=1)
    common.report("unicode_fidelity", monitor, tables(runs, seeds), payload)


if __name__ == "__main__":
    main()
