"""IOMM sampler throughput: images per second of `Recipe.generate` (the frozen MLLM's two
conditions, then Euler with classifier-free guidance inside one jit, 2B examples per step) on
the tiny config's last stage.

  python benchmarks/iomm_sampler.py --workdir WORKDIR_OF_THE_MAIN_JOB [--batch 16,48] [--steps 20]
"""

from __future__ import annotations

import time

import common


def main():
    p = common.parser(__doc__)
    p.add_argument("--workdir", required=True, help="a workdir of configs/iomm.py:tiny (the main job)")
    p.add_argument("--batch", default="16,48")
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    common.setup()
    import jax

    from mmjax import config as config_lib
    from mmjax.data import pipeline
    from mmjax.train import stages, trainer as trainer_lib

    config = config_lib.load(
        f"{common.ROOT}/configs/iomm.py:tiny", [f"stage2.model.sample.steps={args.steps}"]
    )
    trainer = trainer_lib.Trainer(*stages.last(config, args.workdir))
    state, frozen, _, _ = trainer.latest()
    params = trainer.full_params(state, frozen)
    ev = trainer.recipe.evaluators()["geneval"]
    rows, monitor = [], common.quiet(args.wait_quiet)
    gen = jax.jit(trainer.recipe.generate)
    for b in (int(x) for x in args.batch.split(",")):
        spec = ev.data.copy_and_resolve_references()
        with spec.unlocked():
            spec.batch_size = b
        batch = next(iter(pipeline.eval_dataset(spec, config.stage2.data.image_size, ev.preprocess)))
        t0 = time.perf_counter()
        jax.block_until_ready(gen(params, batch, jax.random.key(0)))
        compile_s, times = time.perf_counter() - t0, []
        for r in range(args.reps):
            t0 = time.perf_counter()
            jax.block_until_ready(gen(params, batch, jax.random.key(r + 1)))
            times.append(time.perf_counter() - t0)
        s = common.median(times)
        rows.append(
            {
                "batch": b,
                "steps": args.steps,
                "seconds": round(s, 3),
                "images_per_s": round(b / s, 1),
                "first_call_s": round(compile_s, 1),
                "range_s": common.spread(times),
            }
        )
    common.report("iomm_sampler", monitor, [("sampler throughput", rows, list(rows[0]))], {"rows": rows})


if __name__ == "__main__":
    main()
