"""Trainer loop overhead versus a bare jitted train step on the same batch (goal: <= 3%).

  python benchmarks/loop_overhead.py                       # tiny + mid, shipped + render, workers 0, 1
  python benchmarks/loop_overhead.py --variants tiny,mid,large --reps 5 --scale 2 --wait-quiet 300

Per setting (model variant, data mode, num_workers), interleaved over `--reps` repetitions:

  bare     `Trainer.compile_step` once; one batch put on device once; the compiled step called
           N times in a tight Python loop, blocked once at the end: seconds per step.
  loop     one `Trainer.fit()` of S steps in a fresh workdir (no evaluators; save_every huge,
           so only the final save happens), its compiled step wrapped in a recorder: seconds
           per step between the calls right after two metric syncs (steps k*log_every+1), so
           the queued device work cancels; the first window (first call, worker start-up) and
           everything after the last sync (final save) are left out.
  overhead = loop / bare - 1: the median over repetitions of each repetition's ratio (bare is
           measured just before that repetition's fit, so slow drifts in machine load cancel).

Data modes (common.DATA): `shipped` is the config as shipped (shapes records rendered once at
start and served from memory); `render` renders every record on the fly.

The same fit is instrumented: over the same window, wall ms per step spent in
`parallel.global_batch`, dispatching the compiled step, blocked at the metric sync
(device_sync), writing metrics, `Progress.update`, `_check_streak`, and what is left:
`next(data_iter)` (data_wait). The loop runs up to log_every steps ahead of the device, so
data_wait overlaps queued compute; what a CPU host loses shows in cpu_ms, the machine's CPU
ms per step (all processes, from /proc/stat: only meaningful with other_cores ~ 0) against
bare_cpu_ms. XLA already uses every core, so extra host CPU slows the step itself.
"""

from __future__ import annotations

import collections
import gc
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common

STEPS = {"tiny": (40, 80), "mid": (20, 60), "large": (5, 45)}  # bare steps per repetition, fit steps
PARTS = [
    "data_wait",
    "global_batch",
    "dispatch",
    "device_sync",
    "metrics_write",
    "progress",
    "bad_step_check",
]


class _Recorded:
    """A compiled step that logs each call (start, dispatch time, machine CPU seconds)."""

    def __init__(self, compiled, probe):
        self._compiled, self._probe = compiled, probe

    def __call__(self, *args):
        self._probe.busy.append(common.busy_seconds())
        t0 = time.perf_counter()
        out = self._compiled(*args)
        self._probe.starts.append(t0)
        self._probe.events.append(("dispatch", t0, time.perf_counter()))
        return out

    def __getattr__(self, name):  # memory_analysis() for log_memory
        return getattr(self._compiled, name)


class Probe:
    """Instruments one `Trainer.fit` (monkeypatches, all undone on exit)."""

    def __init__(self):
        self.starts, self.busy, self.events, self._undo = [], [], [], []

    def _set(self, owner, name, value):
        self._undo.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def _timed(self, owner, name, key, before=None):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if before:
                before(*args)
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.events.append((key, t0, time.perf_counter()))

        self._set(owner, name, wrapper)

    def _sync(self, writer, step, metrics):  # the device sync that write would do, timed apart
        import jax

        t0 = time.perf_counter()
        jax.block_until_ready(metrics)
        self.events.append(("device_sync", t0, time.perf_counter()))

    def __enter__(self):
        from mmjax import parallel
        from mmjax.train import metrics, trainer

        compile_step = trainer.Trainer.compile_step
        self._set(trainer.Trainer, "compile_step", lambda t, b: _Recorded(compile_step(t, b), self))
        self._timed(parallel, "global_batch", "global_batch")
        self._timed(metrics.MetricWriter, "write", "metrics_write", before=self._sync)
        self._timed(metrics.Progress, "update", "progress")
        self._timed(trainer.Trainer, "_check_streak", "bad_step_check")
        return self

    def __exit__(self, *exc):
        for owner, name, value in reversed(self._undo):
            setattr(owner, name, value)

    def breakdown(self, log_every: int) -> dict | None:
        """ms per step over the steady window: loop, cpu and each part; None if too short.

        starts[i] is the call of step i+1; the call of step k*log_every+1 follows the sync of
        step k*log_every, so at most one step is queued there. The window runs from the first
        such call after the first sync to the last one.
        """
        marks = [k * log_every for k in range(1, len(self.starts) // log_every + 1)]
        marks = [m for m in marks if m < len(self.starts)]
        if len(marks) < 2:
            return None
        a, b = marks[0], marks[-1]
        t_a, t_b = self.starts[a], self.starts[b]
        parts = collections.Counter()
        for name, t0, t1 in self.events:
            if t_a <= t0 and t1 <= t_b:
                parts[name] += t1 - t0
        parts["data_wait"] = t_b - t_a - sum(parts.values())
        ms = lambda sec: 1e3 * sec / (b - a)
        out = {"loop_ms": ms(t_b - t_a), "cpu_ms": ms(self.busy[b] - self.busy[a])}
        return out | {f"{k}_ms": ms(parts[k]) for k in PARTS}


def run_fit(config, steps: int):
    """One fresh `Trainer.fit` of `steps` steps; returns (wall seconds, probe)."""
    from mmjax.train import trainer

    with config.unlocked():
        config.train.steps = steps
    workdir = tempfile.mkdtemp(prefix="mmjax_bench_fit_")
    stdout = sys.stdout
    try:
        with Probe() as probe, open(os.devnull, "w") as sys.stdout:  # log_memory's line
            t0 = time.perf_counter()
            trainer.Trainer(config, workdir).fit()
            wall = time.perf_counter() - t0
    finally:
        sys.stdout = stdout
        shutil.rmtree(workdir, ignore_errors=True)
        gc.collect()  # ends this fit's grain worker processes before the next measurement
    return wall, probe


def main():
    parser = common.parser(__doc__)
    parser.add_argument("--variants", default="tiny,mid", help="comma list of " + ",".join(common.VARIANTS))
    parser.add_argument("--workers", default="0,1", help="data.num_workers values, comma list")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every variant's STEPS")
    args = parser.parse_args()

    common.setup(compilation_cache=True)
    from mmjax import parallel
    from mmjax.data import pipeline
    from mmjax.train import trainer as trainer_lib

    variants = args.variants.split(",")
    settings = [
        (v, d, int(w)) for v in variants for d in args.data.split(",") for w in args.workers.split(",")
    ]
    monitor = common.CpuMonitor()

    def fit_config(v, d, w):
        return common.load_config(v, d, ["train.save_every=1000000000", f"data.num_workers={w}"])

    bench = {}
    for v in variants:
        bare_n, fit_n = (max(round(x * args.scale), 1) for x in STEPS[v])
        config = fit_config(v, "render", 0)  # the step does not depend on the data mode
        trainer = trainer_lib.Trainer(config, common.tempdir("mmjax_bench_bare_"))
        local = pipeline.first_batch(pipeline.train_dataset(config, trainer.recipe.preprocess))
        compiled = trainer.compile_step(trainer.abstract_batch(local))
        batch = parallel.global_batch(local, trainer.batch_sharding)
        *_, state = common.bare_step(compiled, trainer.init_state(), batch, 3)  # warm-up
        bench[v] = {"config": config, "compiled": compiled, "batch": batch, "state": state}
        bench[v] |= {"n": (bare_n, fit_n), "params": trainer.num_params}
        run_fit(fit_config(v, "shipped", 0), 2)  # warm-up: first-time imports, the cache fill

    runs = collections.defaultdict(list)
    for rep in range(args.reps):
        for v, d, w in settings:
            b = bench[v]
            bare_n, fit_n = b["n"]
            block = common.quiet(args.wait_quiet)
            sec, cpu, b["state"] = common.bare_step(b["compiled"], b["state"], b["batch"], bare_n)
            config = fit_config(v, d, w)
            wall, probe = run_fit(config, fit_n)
            prof = probe.breakdown(config.train.log_every)
            if prof is None:
                sys.exit(f"{v}: {fit_n} fit steps leave no steady window; need > 2 * log_every")
            run = {"bare_ms": 1e3 * sec, "bare_cpu_ms": 1e3 * cpu, "fit_s": wall, **prof}
            run.update(ratio=run["loop_ms"] / run["bare_ms"], other=block.summary()["other_cores"])
            runs[(v, d, w)].append(run)
            print(
                f"rep {rep} {v} data={d} workers={w}: bare {run['bare_ms']:.2f} ms, loop {run['loop_ms']:.2f} "
                f"ms ({100 * (run['ratio'] - 1):+.1f}%), fit {wall:.1f} s, other load {run['other']:.2f} cores",
                flush=True,
            )

    rows = []
    for (v, d, w), rs in runs.items():
        row = {"variant": v, "data": d, "workers": w, "params": bench[v]["params"], "steps": bench[v]["n"][1]}
        row |= {k: common.median([r[k] for r in rs]) for k in rs[0]}
        row["batch"] = bench[v]["config"].data.global_batch_size
        row["overhead_pct"] = 100 * (row["ratio"] - 1)
        row["overhead_range_pct"] = common.spread([100 * (r["ratio"] - 1) for r in rs])
        row["extra_cpu_ms"] = common.median([r["cpu_ms"] - r["bare_cpu_ms"] for r in rs])
        row["other_cores"] = f"{row['other']:.2f} (max {max(r['other'] for r in rs):.2f})"
        row["goal_met"] = "yes" if row["overhead_pct"] <= 3 else "no"
        rows.append(row)

    key = ["variant", "data", "workers"]
    overhead = [*key, "params", "batch", "steps", "bare_ms", "loop_ms", "overhead_pct", "overhead_range_pct"]
    profile = [*key, "bare_cpu_ms", "cpu_ms", "extra_cpu_ms", *(f"{k}_ms" for k in PARTS)]
    common.report(
        "loop_overhead",
        monitor,
        [
            ("overhead (medians over repetitions):", rows, [*overhead, "fit_s", "other_cores", "goal_met"]),
            ("where the loop's time goes (ms per step, medians over repetitions):", rows, profile),
        ],
        {"reps": args.reps, "rows": rows, "raw": {"/".join(map(str, k)): r for k, r in runs.items()}},
    )


if __name__ == "__main__":
    main()
