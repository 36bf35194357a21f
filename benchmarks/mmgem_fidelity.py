"""MM-GEM's fidelity checks (RESULTS.md): does joint training (L = L_emb + L_gen) cost either side
much, and what does stage 2 do for region retrieval?

Every seed runs these, each in its own process, at the same step count:
  clip     configs/mmgem.py:tiny_stage1 with tasks=("embed",): InfoNCE only
  caption  tasks=("caption",): captioning only
  joint    tasks=("embed", "caption"): the recipe's stage 1, exported for stage2
  stage2   configs/mmgem.py:tiny's region_caption and region_retrieval stages, starting from the
           joint run's export (the pipeline's stage 1 has the same config and seed, so it is not
           trained twice); region_caption also evaluates region retrieval: it trains only h3 and
           the soft prompts, so h4 is still stage 1's identity there
Each stage-1 run evaluates retrieval, zero-shot, captioning and region retrieval (h4 = identity).
The untrained side of a one-task run is evaluated too: it shows what chance looks like.

  python benchmarks/mmgem_fidelity.py --workdir /tmp/mmgem_fid --steps 300 --seeds 0,1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import common

CONFIG = os.path.join(common.ROOT, "configs", "mmgem.py")
ARMS = {"clip": ("embed",), "caption": ("caption",), "joint": ("embed", "caption")}
STAGE2 = ("region_caption", "region_retrieval")
STAGE1_COLUMNS = {
    "retrieval/i2t_R@1": "image->text R@1",
    "retrieval/t2i_R@1": "text->image R@1",
    "zeroshot/accuracy": "zero-shot acc.",
    "captioning/accuracy": "caption acc.",
    "captioning/cider_d": "CIDEr-D",
    "region_retrieval/i2t_R@1": "region->text R@1 (h4 = I)",
    "region_retrieval/t2i_R@1": "text->region R@1 (h4 = I)",
}
REGION_COLUMNS = {
    "region_retrieval/i2t_R@1": "region->text R@1",
    "region_retrieval/t2i_R@1": "text->region R@1",
    "region_captioning/exact": "region caption exact",
    "region_captioning/cider_d": "region CIDEr-D",
    "captioning/accuracy": "whole-image caption acc.",
    "captioning/cider_d": "whole-image CIDEr-D",
}


def floats(results: dict) -> dict:
    return {k: v for k, v in results.items() if isinstance(v, float)}


def run_one(arm: str, seed: int, steps: int, region_steps: int, workdir: str) -> dict:
    """One arm and seed, trained and evaluated; {stage: final float metrics}."""
    common.setup()
    from mmjax import config as config_lib
    from mmjax.train import stages, trainer

    tiny = config_lib.load(CONFIG + ":tiny")
    region_eval = tiny.region_retrieval.evals.region_retrieval.copy_and_resolve_references()
    if arm == "stage2":
        export = os.path.join(os.path.dirname(workdir), f"joint_seed{seed}", "export")
        over = [f"region_caption.init.mmgem.path={export}"]
        over += [f"{s}.{o}" for s in STAGE2 for o in (f"seed={seed}", f"train.steps={region_steps}")]
        cfg = config_lib.load(CONFIG + ":tiny", over)
        with cfg.unlocked():
            cfg.region_caption.evals.region_retrieval = region_eval
        return {k: floats(v) for k, v in stages.train(cfg, workdir).items()}
    over = [f"tasks={ARMS[arm]!r}", f"train.steps={steps}", f"seed={seed}", "train.save_every=0"]
    cfg = config_lib.load(CONFIG + ":tiny_stage1", over)
    with cfg.unlocked():
        cfg.evals.region_retrieval = region_eval
    results = floats(trainer.train(cfg, workdir))
    if arm == "joint":
        trainer.Trainer(cfg, workdir).export(os.path.join(workdir, "export"), "")
    return {"stage1": results}


def cell(values: list[float]) -> str:
    """mean (seed values), for the tables."""
    if len(values) == 1:
        return common.num(values[0])
    return f"{statistics.mean(values):.3f} ({', '.join(f'{v:.3f}' for v in values)})"


def tables(runs: dict, seeds: list[str]) -> list[tuple[str, list[dict], list[str]]]:
    def values(arm, stage, key):
        return [runs[f"{arm}_seed{s}"][stage][key] for s in seeds if f"{arm}_seed{s}" in runs]

    arms = [a for a in ARMS if any(f"{a}_seed{s}" in runs for s in seeds)]
    one = [{"arm": a, **{t: cell(values(a, "stage1", k)) for k, t in STAGE1_COLUMNS.items()}} for a in arms]
    two = []
    if any(f"stage2_seed{s}" in runs for s in seeds):
        for label, arm, stage in (
            ("stage 1 (joint), h4 = I", "joint", "stage1"),
            ("after region_caption, h4 = I", "stage2", "region_caption"),
            ("after region_retrieval, h4 trained", "stage2", "region_retrieval"),
        ):
            row = {"weights": label}
            for k, t in REGION_COLUMNS.items():
                v = values(arm, stage, k) if k in runs[f"{arm}_seed{seeds[0]}"][stage] else []
                row[t] = cell(v) if v else "-"
            two.append(row)
    return [
        (f"stage 1 arms, mean (seeds {', '.join(seeds)})", one, ["arm", *STAGE1_COLUMNS.values()]),
        (
            f"region retrieval and captioning, mean (seeds {', '.join(seeds)})",
            two,
            ["weights", *REGION_COLUMNS.values()],
        ),
    ]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="kept: a rerun skips the runs already finished")
    p.add_argument("--steps", type=int, default=300, help="stage 1 steps (every arm)")
    p.add_argument("--region-steps", type=int, default=150, help="steps of each stage 2 stage")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--arms", default=",".join([*ARMS, "stage2"]), help="stage2 needs joint")
    p.add_argument("--run-one", default="", help="internal: ARM,SEED (one run, in this process)")
    args = p.parse_args()
    if args.run_one:
        arm, seed = args.run_one.split(",")
        out = os.path.join(args.workdir, f"{arm}_seed{seed}")
        results = run_one(arm, int(seed), args.steps, args.region_steps, out)
        with open(os.path.join(out, "fidelity.json"), "w") as f:
            json.dump(results, f, indent=1)
        return
    os.makedirs(args.workdir, exist_ok=True)
    monitor, seeds, runs, seconds = common.CpuMonitor(), args.seeds.split(","), {}, {}
    for seed in seeds:
        for arm in args.arms.split(","):
            name = f"{arm}_seed{seed}"
            cmd = [sys.executable, os.path.abspath(__file__), "--workdir", args.workdir]
            cmd += ["--steps", str(args.steps), "--region-steps", str(args.region_steps)]
            runs[name] = common.cached_run(
                [*cmd, "--run-one", f"{arm},{seed}"], os.path.join(args.workdir, name, "fidelity.json")
            )
            seconds[name] = runs[name].pop("seconds", None)
            print(json.dumps({"run": name, "seconds": seconds[name], **runs[name]}), flush=True)
    payload = {"runs": runs, "seconds": seconds, "steps": args.steps, "region_steps": args.region_steps}
    with open(os.path.join(args.workdir, "mmgem_fidelity.json"), "w") as f:
        json.dump(payload, f, indent=1)
    common.report("mmgem_fidelity", monitor, tables(runs, seeds), payload)


if __name__ == "__main__":
    main()
