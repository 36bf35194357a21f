"""MM-GEM tiny train-step throughput: the joint step (L_emb + L_gen) against each objective alone.

  python benchmarks/mmgem_step.py                      # configs/mmgem.py:tiny_stage1, 3 rounds
  python benchmarks/mmgem_step.py --steps 20 --reps 5 --wait-quiet 60

Each variant (tasks = embed | caption | embed,caption) is a Trainer on the same config; its step
is compiled once and called on one fixed on-device batch (`common.bare_step`), the variants
interleaved over `--reps` rounds. The joint step runs the ViT once for both objectives, so it
should cost less than the two alone together: `joint / (embed + caption)` < 1.
"""

from __future__ import annotations

import common

VARIANTS = {"embed": "('embed',)", "caption": "('caption',)", "joint": "('embed', 'caption')"}


def main():
    p = common.parser(__doc__)
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    args = p.parse_args()
    common.setup()
    import jax

    from mmjax import config as config_lib, parallel
    from mmjax.data import pipeline
    from mmjax.train import trainer as trainer_lib

    runs = {}
    for name, tasks in VARIANTS.items():
        cfg = config_lib.load(f"{common.ROOT}/configs/mmgem.py:tiny_stage1", [f"tasks={tasks}", "evals={}"])
        t = trainer_lib.Trainer(cfg, common.tempdir("mmgem_step_"))
        local = pipeline.first_batch(pipeline.train_dataset(cfg, t.recipe.preprocess, t.recipe.packing()))
        batch = parallel.global_batch(local, t.batch_sharding)
        step = t.compile_step(t.abstract_batch(local))
        state = t.init_state()
        _, _, state = common.bare_step(step, state, batch, 2)  # warm-up
        runs[name] = dict(step=step, state=state, batch=batch, times=[], size=cfg.data.global_batch_size)
    monitor = common.quiet(args.wait_quiet)
    for _ in range(args.reps):
        for run in runs.values():
            sec, _, run["state"] = common.bare_step(run["step"], run["state"], run["batch"], args.steps)
            run["times"].append(sec)
    rows = []
    for name, run in runs.items():
        sec = common.median(run["times"])
        rows.append({"tasks": name, "ms_per_step": 1e3 * sec, "examples_per_s": run["size"] / sec})
    ms = {r["tasks"]: r["ms_per_step"] for r in rows}
    ratio = ms["joint"] / (ms["embed"] + ms["caption"])
    print(f"jax {jax.__version__}, devices {jax.device_count()}")
    common.report(
        "mmgem_step",
        monitor,
        [
            (
                f"tiny step, batch {runs['joint']['size']}; joint / (embed + caption) = {ratio:.3f}",
                rows,
                ["tasks", "ms_per_step", "examples_per_s"],
            )
        ],
        {"rows": rows, "joint_over_sum": ratio},
    )


if __name__ == "__main__":
    main()
