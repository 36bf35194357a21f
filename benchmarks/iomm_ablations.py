"""IOMM's fidelity ablations (RESULTS.md): masked image modelling's ratio, image-only pre-training +
mixed fine-tuning against paired-only training, RQA against the MetaQuery-style connector.

One frozen MLLM (configs/iomm.py:tiny's `mllm` stage) is trained once and shared; then every arm
runs for every seed, each in its own process:
  mask_R       stage 1 (image-only) then stage 2 (mixed), model.mim.ratio=R in both
  paired_only  stage 2's pairs alone, from scratch, for the steps of both stages (the same pairs)
  metaquery    the chain with the MetaQuery connector (mask 0.45, like the default RQA arm)
  learned_pos  the chain with learned 2-D position embeddings instead of RoPE (mask 0.45)
Each stage ends with its evaluations: stage 1 reconstruction and the held-out image-only flow
loss; stage 2 GenEval, edits, reconstruction and the held-out flow losses (image-only and
text-conditioned). The noise of the held-out losses is fixed per example, so arms compare on the
same draws.

  python benchmarks/iomm_ablations.py --workdir /tmp/abl --steps 500 --seeds 0,1
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import common

ARMS = ("mask_0", "mask_0.45", "mask_0.85", "paired_only", "metaquery", "learned_pos")
METRICS = {
    "stage1": ("loss_image/loss", "reconstruct/pixel_mse", "reconstruct/exact"),
    "stage2": (
        "loss_t2i/loss",
        "loss_image/loss",
        "geneval/overall",
        "geneval/held_out",
        "edit/correct",
        "reconstruct/pixel_mse",
    ),
}
CONFIG = os.path.join(common.ROOT, "configs", "iomm.py")


def run_one(arm: str, seed: int, steps: int, mllm: str, workdir: str) -> dict:
    """One arm and seed, trained and evaluated; {stage: final metrics}."""
    common.setup()
    from mmjax import config as config_lib
    from mmjax.train import stages, trainer

    if arm == "mllm":  # configs/iomm.py:tiny's first stage, exported where the chain puts it
        cfg = stages.stage_config(config_lib.load(CONFIG + ":tiny"), "mllm", workdir)
        results = trainer.train(cfg, workdir)
        trainer.Trainer(cfg, workdir).export(mllm, "")
        return {"mllm": results}
    if arm == "paired_only":
        cfg = config_lib.load(
            CONFIG + ":tiny_stage2",
            [f"frozen.mllm.path={mllm}", f"train.steps={2 * steps}", f"seed={seed}", "train.save_every=0"],
        )
        with cfg.unlocked():
            del cfg.data.components["images"]
            cfg.data.components.pairs.weight = 1.0
        return {"stage2": trainer.train(cfg, workdir)}
    ratio = float(arm.split("_")[1]) if arm.startswith("mask_") else 0.45
    over = [
        f"stage{s}.{o}"
        for s in (1, 2)
        for o in (
            f"frozen.mllm.path={mllm}",
            f"model.mim.ratio={ratio}",
            f"train.steps={steps}",
            f"seed={seed}",
            "train.save_every=0",
        )
    ]
    if arm == "metaquery":
        over += [f"stage{s}.model.adapter.adapter=metaquery" for s in (1, 2)]
    if arm == "learned_pos":
        over += [f"stage{s}.model.generator.positions=learned" for s in (1, 2)]
    return stages.train(config_lib.load(CONFIG + ":tiny", over), workdir)


def main():
    p = common.parser(__doc__)
    p.add_argument("--workdir", required=True, help="kept: a rerun skips the arms already finished")
    p.add_argument("--steps", type=int, default=500, help="steps per generator stage")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--mllm", default="", help="an MM1 export to use as the frozen MLLM (default: train one)")
    p.add_argument("--run-one", default="", help="internal: ARM,SEED (one arm, in this process)")
    args = p.parse_args()
    mllm = args.mllm or os.path.join(args.workdir, "mllm", "export")
    if args.run_one:
        arm, seed = args.run_one.split(",")
        out = os.path.join(args.workdir, "mllm" if arm == "mllm" else f"{arm}_seed{seed}")
        results = run_one(arm, int(seed), args.steps, mllm, out)
        with open(os.path.join(out, "ablation.json"), "w") as f:
            json.dump(
                {s: {k: v for k, v in r.items() if isinstance(v, float)} for s, r in results.items()}, f
            )
        return
    os.makedirs(args.workdir, exist_ok=True)
    monitor = common.CpuMonitor()
    if not os.path.exists(os.path.join(mllm, "meta.json")):  # the chain's own MLLM stage, once
        cmd = [sys.executable, os.path.abspath(__file__), "--workdir", args.workdir, "--run-one", "mllm,0"]
        subprocess.run(cmd, check=True, cwd=common.ROOT)
    rows = []
    for seed in args.seeds.split(","):
        for arm in args.arms.split(","):
            out = os.path.join(args.workdir, f"{arm}_seed{seed}")
            cmd = [sys.executable, os.path.abspath(__file__), "--workdir", args.workdir]
            cmd += ["--steps", str(args.steps), "--mllm", mllm, "--run-one", f"{arm},{seed}"]
            res = common.cached_run(cmd, os.path.join(out, "ablation.json"))
            row = {"arm": arm, "seed": seed, "seconds": res.get("seconds")}
            for stage, keys in METRICS.items():
                row.update({f"{stage}:{k}": res[stage][k] for k in keys if k in res.get(stage, {})})
            rows.append(row)
            print(json.dumps(row), flush=True)
    columns = ["arm", "seed", *(f"{s}:{k}" for s, keys in METRICS.items() for k in keys)]
    common.report(
        "iomm_ablations",
        monitor,
        [("final metrics per arm and seed", rows, columns)],
        {"rows": rows, "steps": args.steps},
    )


if __name__ == "__main__":
    main()
