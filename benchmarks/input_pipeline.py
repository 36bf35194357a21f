"""Input pipeline samples/s versus what the tiny train step consumes (goal: >= 5x).

  python benchmarks/input_pipeline.py                    # shipped + render, num_workers 0, 1, 2
  python benchmarks/input_pipeline.py --batches 100 --reps 5 --wait-quiet 300

The pipeline is the one `Trainer.fit` builds for configs/vit_shapes.py:tiny, per data mode
(common.DATA: `shipped` serves records cached in memory at start, `render` renders them on
the fly): `pipeline.train_dataset(config, recipe.preprocess)` (build_s: its construction,
which renders the cache; with workers each worker reads the source itself, uncached).
Interleaved over `--reps` repetitions, with medians reported:

  step      the compiled tiny train step (`Trainer.compile_step`) on one on-device batch, called
            in a tight loop: consumed samples/s = global batch / seconds per step.
  pipeline  a fresh iterator per measurement: time to its first batch (worker start-up), then
            `--warmup` batches, then samples/s over `--batches` batches, nothing else running.
  ratio     pipeline / step samples/s: the median over repetitions of each repetition's ratio
            (the step measured just before); the goal is >= 5.

Per sample on the main thread: source_ms, the component source's `__getitem__` (a list
lookup when cached, rendering otherwise); preprocess_ms, the recipe's preprocess; batch_ms,
the whole path without workers (one batch of the stream / batch size: source, preprocess,
grain's per-record bookkeeping, batching).
"""

from __future__ import annotations

import collections
import functools
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common


def pipeline_rate(make, num_workers: int, warmup: int, batches: int, batch_size: int):
    """(seconds to the first batch, samples/s over `batches` batches after `warmup`) of the
    stream `make(num_workers)` builds."""
    t0 = time.perf_counter()
    it = make(num_workers=num_workers)
    next(it)
    first = time.perf_counter() - t0
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * batch_size / (time.perf_counter() - t0)
    del it
    gc.collect()  # ends this iterator's worker processes before the next measurement
    return first, rate


def ms_per_call(fn, args) -> float:
    t0 = time.perf_counter()
    for a in args:
        fn(a)
    return 1e3 * (time.perf_counter() - t0) / len(args)


def main():
    parser = common.parser(__doc__)
    parser.add_argument("--workers", default="0,1,2", help="data.num_workers values, comma list")
    parser.add_argument("--batches", type=int, default=60, help="timed batches per measurement")
    parser.add_argument("--warmup", type=int, default=10, help="untimed batches after the first")
    parser.add_argument("--steps", type=int, default=100, help="bare train steps per measurement")
    args = parser.parse_args()

    common.setup()
    from mmjax import parallel
    from mmjax.data import pipeline
    from mmjax.train import trainer as trainer_lib

    monitor = common.CpuMonitor()
    datas, workers = args.data.split(","), [int(w) for w in args.workers.split(",")]
    steps = [f"train.steps={1 + args.warmup + args.batches}"]
    configs = {d: common.load_config("tiny", d, steps) for d in datas}
    config = configs[datas[0]]
    gb = config.data.global_batch_size

    trainer = trainer_lib.Trainer(config, common.tempdir("mmjax_bench_pipe_"))
    datasets, per_sample = {}, {}
    for d in datas:
        t0 = time.perf_counter()
        datasets[d] = functools.partial(pipeline.train_dataset, configs[d], trainer.recipe.preprocess)
        ds = datasets[d]()
        per_sample[d] = {"build_s": time.perf_counter() - t0}
        source = pipeline.make_source(configs[d].data.components.shapes, configs[d].data.image_size)
        records = [source[i] for i in range(8 * gb)]  # also a warm-up
        per_sample[d]["source_ms"] = ms_per_call(source.__getitem__, range(8 * gb))
        per_sample[d]["preprocess_ms"] = ms_per_call(trainer.recipe.preprocess("shapes"), records)
        per_sample[d]["batch_ms"] = ms_per_call(lambda _: next(ds), range(8)) / gb
    local = pipeline.first_batch(datasets[datas[0]]())
    compiled = trainer.compile_step(trainer.abstract_batch(local))
    batch = parallel.global_batch(local, trainer.batch_sharding)
    *_, state = common.bare_step(compiled, trainer.init_state(), batch, 5)  # warm-up

    step_sps, first, rates, ratios, other = (collections.defaultdict(list) for _ in range(5))
    for rep in range(args.reps):
        for key in [(d, w) for d in datas for w in workers]:
            block = common.quiet(args.wait_quiet)
            sec, _, state = common.bare_step(compiled, state, batch, args.steps)
            f, rate = pipeline_rate(datasets[key[0]], key[1], args.warmup, args.batches, gb)
            step_sps[key].append(gb / sec)
            first[key].append(f)
            rates[key].append(rate)
            ratios[key].append(rate * sec / gb)
            other[key].append(block.summary()["other_cores"])
            print(
                f"rep {rep} data={key[0]} workers={key[1]}: step {gb / sec:.0f} samples/s, pipeline "
                f"{rate:.0f} samples/s ({ratios[key][-1]:.2f}x), first batch {f:.2f} s, "
                f"other load {other[key][-1]:.2f} cores",
                flush=True,
            )

    rows = []
    for (d, w), rs in ratios.items():
        ratio = common.median(rs)
        rows.append(
            {"data": d, "workers": w, **per_sample[d]}
            | {"first_batch_s": common.median(first[d, w]), "pipeline_sps": common.median(rates[d, w])}
            | {"pipeline_range": common.spread(rates[d, w]), "step_sps": common.median(step_sps[d, w])}
            | {"ratio": ratio, "ratio_range": common.spread(rs), "goal_met": "yes" if ratio >= 5 else "no"}
            | {"other_cores": f"{common.median(other[d, w]):.2f} (max {max(other[d, w]):.2f})"}
        )
    common.report(
        "input_pipeline",
        monitor,
        [(f"vit_shapes tiny, global batch {gb}, medians over {args.reps} repetitions:", rows, list(rows[0]))],
        {
            "reps": args.reps,
            "rows": rows,
            "raw": {
                f"{d}/{w}": {
                    "step_sps": step_sps[d, w],
                    "pipeline_sps": rates[d, w],
                    "other_cores": other[d, w],
                }
                for d, w in rates
            },
        },
    )


if __name__ == "__main__":
    main()
