"""Input pipeline samples/s versus what the tiny train step consumes (goal: >= 5x).

  python benchmarks/input_pipeline.py                    # num_workers 0, 1, 2
  python benchmarks/input_pipeline.py --batches 200 --reps 5

The pipeline is the one `Trainer.fit` builds for configs/vit_shapes.py:tiny:
`pipeline.train_dataset(config, recipe.preprocess)` then `pipeline.to_iter(ds, num_workers,
data.prefetch)`. Interleaved over `--reps` repetitions, with medians reported:

  step       the compiled tiny train step (`Trainer.compile_step`) on one on-device batch,
             called in a tight loop: consumed samples/s = global batch / seconds per step.
  alone      a fresh iterator per num_workers: time to its first batch (worker start-up), then
             `--warmup` batches, then samples/s over `--batches` batches, with nothing else
             running. ratio = alone / step, the median over repetitions of each
             repetition's ratio (step measured just before): the goal is >= 5.
  loaded     the same while a thread runs the train step back to back (XLA uses both cores):
             the pipeline's samples/s and the step's samples/s at the same time. On a 2-core
             machine this, not `alone`, is what a training run sees.

`--source shapes,cached` adds rows where `pipeline.make_source` returns a list of `--cached`
pre-rendered shapes records: the same grain pipeline (repeat, shuffle, preprocess, batch) with
rendering taken out, i.e. the pipeline's ceiling if rendering were free.

`--breakdown` adds where one sample's time goes in the main process: the shapes source's
`__getitem__` (scene sampling + rendering), the recipe's preprocess, and batching.
"""

from __future__ import annotations

import argparse
import collections
import gc
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common


class CachedSource:
    """Patches `pipeline.make_source` to return pre-rendered records (a plain list)."""

    def __init__(self, records: int):
        self.records, self._cache, self._original = records, {}, None

    def __enter__(self):
        from mmjax.data import pipeline

        self._original = original = pipeline.make_source

        def make_source(comp, image_size):
            key = (comp.source, comp.split, comp.view, image_size)
            if key not in self._cache:
                source = original(comp, image_size)
                self._cache[key] = [source[i] for i in range(min(self.records, len(source)))]
            return self._cache[key]

        pipeline.make_source = make_source
        return self

    def __exit__(self, *exc):
        from mmjax.data import pipeline

        pipeline.make_source = self._original
        return False


def pipeline_rate(ds, num_workers: int, prefetch: int, warmup: int, batches: int, batch_size: int):
    """(seconds to the first batch, samples/s over `batches` batches after `warmup`)."""
    from mmjax.data import pipeline

    t0 = time.perf_counter()
    it = iter(pipeline.to_iter(ds, num_workers, prefetch))
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


class StepLoop(threading.Thread):
    """Runs the compiled step back to back until stopped; counts completed steps."""

    def __init__(self, compiled, state, batch):
        super().__init__(daemon=True)
        self.compiled, self.state, self.batch = compiled, state, batch
        self.stop, self.steps, self.t = threading.Event(), 0, None

    def run(self):
        import jax

        self.t = [time.perf_counter(), None]
        while not self.stop.is_set():
            self.state, metrics = self.compiled(self.state, self.batch)
            jax.block_until_ready(metrics)
            self.steps += 1
        self.t[1] = time.perf_counter()


def breakdown(config, recipe, samples: int) -> dict:
    """Milliseconds per sample in the shapes source, the preprocess and batching (1 thread)."""
    import numpy as np

    from mmjax.data import pipeline

    name = min(config.data.components)
    source = pipeline.make_source(config.data.components[name], config.data.image_size)
    preprocess = recipe.preprocess(name)
    t0 = time.perf_counter()
    records = [source[i] for i in range(samples)]
    t1 = time.perf_counter()
    processed = [preprocess(r) for r in records]
    t2 = time.perf_counter()
    bs = config.data.global_batch_size
    for i in range(0, samples - bs + 1, bs):
        chunk = processed[i : i + bs]
        {k: np.stack([p[k] for p in chunk]) for k in chunk[0]}
    t3 = time.perf_counter()
    n_batched = (samples // bs) * bs
    ds = pipeline.train_dataset(config, recipe.preprocess)  # the full random-access path
    n = max(samples // bs, 1)
    t4 = time.perf_counter()
    for i in range(n):
        ds[i]
    t5 = time.perf_counter()
    return {
        "source_ms": 1e3 * (t1 - t0) / samples,
        "preprocess_ms": 1e3 * (t2 - t1) / samples,
        "batching_ms": 1e3 * (t3 - t2) / max(n_batched, 1),
        "dataset_getitem_ms": 1e3 * (t5 - t4) / (n * bs),
    }


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", default="0,1,2", help="data.num_workers values, comma list")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batches", type=int, default=60, help="timed batches per measurement")
    parser.add_argument("--warmup", type=int, default=10, help="untimed batches after the first")
    parser.add_argument("--steps", type=int, default=100, help="bare train steps per measurement")
    parser.add_argument("--source", default="shapes", help="shapes, cached or shapes,cached")
    parser.add_argument("--cached", type=int, default=2048, help="pre-rendered records for --source cached")
    parser.add_argument("--no-loaded", action="store_true", help="skip the measurement under a running step")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each measurement wait up to SECONDS for other load to stop",
    )
    parser.add_argument("--breakdown", action="store_true", help="per-sample cost of source/preprocess/batch")
    args = parser.parse_args()

    common.setup()
    from mmjax import parallel
    from mmjax.data import pipeline
    from mmjax.train import trainer as trainer_lib

    workers = [int(w) for w in args.workers.split(",")]
    need = 1 + args.warmup + args.batches
    config = common.load_config("tiny", [f"train.steps={need + 10}"])
    gb = config.data.global_batch_size
    monitor = common.CpuMonitor()

    trainer = trainer_lib.Trainer(config, common.tempdir("mmjax_bench_pipe_"))
    ds = pipeline.train_dataset(config, trainer.recipe.preprocess)
    compiled = trainer.compile_step(trainer.abstract_batch(ds[0]))
    batch = parallel.global_batch(ds[0], trainer.batch_sharding)
    state = trainer.init_state()
    _, state = common.bare_step_seconds(compiled, state, batch, 5)  # warm-up

    datasets = {"shapes": ds}
    if "cached" in args.source.split(","):
        with CachedSource(args.cached):
            datasets["cached"] = pipeline.train_dataset(config, trainer.recipe.preprocess)
    settings = [(src, w) for src in args.source.split(",") for w in workers]

    step_rates, alone, first, loaded_pipe, loaded_step, ratios, other = (
        collections.defaultdict(list) for _ in range(7)
    )
    for rep in range(args.reps):
        for key in settings:
            src, w = key
            common.wait_quiet(args.wait_quiet)
            block_monitor = common.CpuMonitor()
            sec, state = common.bare_step_seconds(compiled, state, batch, args.steps)
            step_rates["alone"].append(gb / sec)
            f, rate = pipeline_rate(datasets[src], w, config.data.prefetch, args.warmup, args.batches, gb)
            first[key].append(f)
            alone[key].append(rate)
            ratios[key].append(rate * sec / gb)  # pipeline samples/s over this rep's step samples/s
            if not args.no_loaded:
                loop = StepLoop(compiled, state, batch)
                loop.start()
                _, rate = pipeline_rate(datasets[src], w, config.data.prefetch, args.warmup, args.batches, gb)
                loop.stop.set()
                loop.join()
                state = loop.state
                loaded_pipe[key].append(rate)
                # the step's rate over the whole loaded measurement (start-up included)
                loaded_step[key].append(loop.steps * gb / (loop.t[1] - loop.t[0]))
            other[key].append(block_monitor.summary()["other_cores"])
            print(
                f"rep {rep} source={src} workers={w}: step {gb / sec:.0f} samples/s; pipeline alone "
                f"{alone[key][-1]:.0f} samples/s (first batch {f:.2f} s)"
                + (
                    ""
                    if args.no_loaded
                    else f"; loaded: pipeline {loaded_pipe[key][-1]:.0f}, "
                    f"step {loaded_step[key][-1]:.0f} samples/s"
                )
                + f"; other load {other[key][-1]:.2f} cores",
                flush=True,
            )

    step_sps = common.median(step_rates["alone"])
    rows = []
    for key in settings:
        src, w = key
        a = common.median(alone[key])
        ratio = common.median(ratios[key])  # median of per-repetition ratios
        row = {
            "source": src,
            "num_workers": w,
            "first_batch_s": common.median(first[key]),
            "pipeline_sps": a,
            "pipeline_range": common.spread(alone[key]),
            "step_sps": step_sps,
            "ratio": ratio,
            "ratio_range": common.spread(ratios[key]),
            "other_cores": common.median(other[key]),
            "goal_met": "yes" if ratio >= 5 else "no",
        }
        if loaded_pipe[key]:
            lp, ls = common.median(loaded_pipe[key]), common.median(loaded_step[key])
            row.update(loaded_pipeline_sps=lp, loaded_step_sps=ls, loaded_ratio=lp / ls)
        rows.append(row)
    parts = breakdown(config, trainer.recipe, 8 * gb) if args.breakdown else None

    info = common.machine()
    print()
    print(f"machine: {info}")
    print(f"cpu use during the run: {monitor.summary()}")
    print(f"command: {common.command_line()}")
    print(
        f"step: vit_shapes tiny, global batch {gb}, {1e3 * gb / step_sps:.2f} ms/step median "
        f"(range {common.spread([1e3 * gb / r for r in step_rates['alone']])} ms)"
    )
    print()
    print(
        common.markdown_table(
            rows,
            [
                "source",
                "num_workers",
                "first_batch_s",
                "pipeline_sps",
                "pipeline_range",
                "step_sps",
                "ratio",
                "ratio_range",
                "goal_met",
                "loaded_pipeline_sps",
                "loaded_step_sps",
                "loaded_ratio",
                "other_cores",
            ],
        )
    )
    if parts:
        print()
        print("per-sample cost, one thread (ms):")
        print(common.markdown_table([parts], list(parts)))
    common.emit(
        "input_pipeline",
        {
            "machine": info,
            "rows": rows,
            "breakdown": parts,
            "reps": args.reps,
            "raw": {
                "step_sps": step_rates["alone"],
                **{
                    name: {f"{s}/{w}": v for (s, w), v in d.items()}
                    for name, d in (
                        ("alone", alone),
                        ("first", first),
                        ("loaded_pipeline", loaded_pipe),
                        ("loaded_step", loaded_step),
                    )
                },
            },
        },
    )


if __name__ == "__main__":
    main()
