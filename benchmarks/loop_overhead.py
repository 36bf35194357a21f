"""Trainer loop overhead versus a bare jitted train step on the same batch (goal: <= 3%).

  python benchmarks/loop_overhead.py                       # tiny + mid, num_workers 0 and 1
  python benchmarks/loop_overhead.py --variants tiny,mid,large --reps 5 --profile

Per model variant (see common.VARIANTS), interleaved over `--reps` repetitions:

  bare     `Trainer.compile_step` once; one batch put on device once; the compiled step called
           N times in a tight Python loop, blocked once at the end: seconds per step.
  fit      `Trainer.fit()` in fresh workdirs for S1 and S2 steps (no evaluators, save_every
           huge so only the final save happens). Two estimates of the loop's seconds per step:
           diff    (T(S2) - T(S1)) / (S2 - S1): cancels init, compile, worker start-up and
                   the final checkpoint.
           inloop  from the times at which fit called the compiled step (the step is wrapped
                   in a recorder): between the calls right after two metric syncs
                   (steps a*log_every+1 and b*log_every+1), so queued device work cancels;
                   steady state only, much less noisy than diff.
  overhead = loop / bare - 1: the median over repetitions of each repetition's ratio (the bare
           time is measured just before that repetition's fits, so slow drifts in the load of
           a shared machine cancel). `other_cores` is the CPU that other processes used
           meanwhile (benchmarks/common.py:CpuMonitor); `--wait-quiet S` waits up to S seconds
           before each measurement for the machine to go idle.

`--data real` runs the config's grain pipeline (the shapes world, rendered on the fly);
`--data cached` swaps `pipeline.train_dataset` for a grain MapDataset over a few
pre-rendered batches, which isolates the loop's own cost (grain iteration, host-to-device
transfer, metrics, tqdm) from the cost of producing the data.

`--profile` adds, per (variant, data, workers), a fresh bare measurement and one instrumented
fit of S2 steps, over the same steady-state window as inloop: wall time per step spent in
`next(data_iter)` (data_wait), in `parallel.global_batch`, dispatching the compiled step,
blocked at the metric sync every log_every steps (device_sync), writing the metrics
(`MetricWriter.write` after the sync), `Progress.update` (tqdm) and `_check_bad_steps`. The
loop runs ahead of the device between two syncs, so data_wait overlaps queued compute: it is
the host's pace, not necessarily time lost. What is lost on a CPU host shows in cpu_ms: the
machine's CPU milliseconds per step (all processes, grain workers included; /proc/stat, so
only meaningful on an otherwise idle machine) against bare_cpu_ms, the same for the bare
loop. XLA already uses every core, so extra_cpu_ms of host work (data rendering, transfers)
slows the step itself.

The persistent compilation cache is on (benchmarks/common.py:setup), so every fit after the
first loads the step from the cache: that shrinks the fixed cost that `diff` cancels.
"""

from __future__ import annotations

import argparse
import collections
import gc
import math
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common

# Per variant: bare steps per repetition, S1, S2 (fit steps).
STEPS = {"tiny": (40, 20, 80), "mid": (20, 10, 50), "large": (5, 5, 45)}


class StepRecorder:
    """Wraps a compiled step: records when each call started and how long dispatch took.

    cpu=True also records the machine's CPU seconds (all processes) at each call.
    """

    def __init__(self, compiled, cpu: bool = False):
        self._compiled, self._cpu = compiled, cpu
        self.starts, self.dispatch, self.busy = [], [], []

    def __call__(self, *args):
        if self._cpu:
            self.busy.append(common.busy_seconds())
        t0 = time.perf_counter()
        out = self._compiled(*args)
        self.starts.append(t0)
        self.dispatch.append(time.perf_counter() - t0)
        return out

    def __getattr__(self, name):  # memory_analysis() etc.
        return getattr(self._compiled, name)


class Patches:
    """Monkeypatches around one `Trainer.fit` (all undone on exit)."""

    def __init__(self, cached_batches=None, profile=False):
        self.cached_batches, self.profile = cached_batches, profile
        self.recorder = None
        self.events = []  # (name, start, end) of each hooked call
        self._undo = []

    def _set(self, owner, name, value):
        self._undo.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def _timed(self, owner, name, key):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.events.append((key, t0, time.perf_counter()))

        self._set(owner, name, wrapper)

    def __enter__(self):
        from mmjax import parallel
        from mmjax.data import pipeline
        from mmjax.train import metrics as metrics_lib
        from mmjax.train import trainer as trainer_lib

        original_compile = trainer_lib.Trainer.compile_step

        def compile_step(trainer, abstract_batch):
            self.recorder = StepRecorder(original_compile(trainer, abstract_batch), cpu=self.profile)
            return self.recorder

        self._set(trainer_lib.Trainer, "compile_step", compile_step)

        if self.cached_batches is not None:
            import grain

            batches = self.cached_batches

            def train_dataset(config, preprocess):  # train.steps batches, like the real one
                steps = config.train.steps
                return grain.MapDataset.source(batches).repeat(math.ceil(steps / len(batches)))[:steps]

            self._set(pipeline, "train_dataset", train_dataset)

        if self.profile:
            self._timed(parallel, "global_batch", "global_batch")
            self._timed(metrics_lib.MetricWriter, "write", "metrics_write")
            timed_write = metrics_lib.MetricWriter.write

            def write(writer, step, metrics):  # the device sync first, timed on its own
                import jax

                t0 = time.perf_counter()
                jax.block_until_ready(metrics)
                self.events.append(("device_sync", t0, time.perf_counter()))
                return timed_write(writer, step, metrics)

            self._set(metrics_lib.MetricWriter, "write", write)
            self._timed(metrics_lib.Progress, "update", "progress_update")
            self._timed(trainer_lib.Trainer, "_check_bad_steps", "check_bad_steps")
        return self

    def __exit__(self, *exc):
        for owner, name, value in reversed(self._undo):
            setattr(owner, name, value)
        return False


def steady_window(starts: list[float], log_every: int):
    """Indices (a, b) into the compiled step's call times bounding the steady state.

    starts[i] is when step i+1 was called. The call for step m*log_every+1 comes right after
    the metric sync of step m*log_every, so at most one step is queued there; measuring
    between two such calls cancels the queue. Skips the first window (first call, worker
    start-up). None when the run is too short for two windows.
    """
    marks = [m * log_every for m in range(1, len(starts) // log_every + 1) if m * log_every < len(starts)]
    return (marks[0], marks[-1]) if len(marks) >= 2 else None


def inloop_seconds(starts: list[float], log_every: int):
    """Steady-state seconds per step of the real loop (see steady_window), or None."""
    window = steady_window(starts, log_every)
    if window is None:
        return None
    a, b = window
    return (starts[b] - starts[a]) / (b - a)


def run_fit(config, steps: int, cached_batches, profile=False):
    """One fresh `Trainer.fit`; returns (wall seconds of fit, recorder, patches)."""
    from mmjax.train import trainer as trainer_lib

    with config.unlocked():
        config.train.steps = steps
    workdir = tempfile.mkdtemp(prefix="mmjax_bench_fit_")
    try:
        with Patches(cached_batches, profile) as patches:
            trainer = trainer_lib.Trainer(config, workdir)
            t0 = time.perf_counter()
            with open(os.devnull, "w") as devnull:
                stdout, sys.stdout = sys.stdout, devnull  # log_memory's line, once per fit
                try:
                    trainer.fit()
                finally:
                    sys.stdout = stdout
            wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        gc.collect()  # ends the grain worker processes of this fit before the next one
    return wall, patches.recorder, patches


def profile_breakdown(patches, log_every: int) -> dict:
    """Milliseconds per step in each part of the loop, over the steady-state window.

    Hooked calls (global_batch, metrics write, progress, bad-step check) and the compiled
    step's dispatch are timed directly; what is left of the window is waiting in
    `next(data_iter)` (plus a few trivial branches of the loop body).
    """
    rec = patches.recorder
    window = steady_window(rec.starts, log_every)
    if window is None:
        return {}
    a, b = window
    t_a, t_b = rec.starts[a], rec.starts[b]
    parts = collections.defaultdict(float)
    parts["dispatch"] = sum(rec.dispatch[a:b])
    for name, t0, t1 in patches.events:
        if t0 >= t_a and t1 <= t_b:
            parts[name] += t1 - t0
    total = t_b - t_a
    parts["data_wait"] = total - sum(parts.values())
    per = lambda sec: 1e3 * sec / (b - a)
    out = {"loop_ms": per(total), **{f"{k}_ms": per(v) for k, v in parts.items()}}
    if rec.busy:
        out["cpu_ms"] = per(rec.busy[b] - rec.busy[a])
    return out


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", default="tiny,mid", help="comma list of " + ",".join(common.VARIANTS))
    parser.add_argument("--workers", default="0,1", help="data.num_workers values, comma list")
    parser.add_argument("--data", default="real", help="real, cached or real,cached")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiplies the default step counts (bare N, S1, S2) of every variant",
    )
    parser.add_argument("--profile", action="store_true", help="one extra instrumented fit per setting")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each measurement wait up to SECONDS for other load to stop",
    )
    args = parser.parse_args()

    common.setup(compilation_cache=True)
    from mmjax import parallel
    from mmjax.data import pipeline
    from mmjax.train import trainer as trainer_lib

    variants = args.variants.split(",")
    workers = [int(w) for w in args.workers.split(",")]
    datas = args.data.split(",")
    settings = [(v, d, w) for v in variants for d in datas for w in workers]
    monitor = common.CpuMonitor()

    def fit_config(v, w):
        return common.load_config(v, ["train.save_every=1000000000", f"data.num_workers={w}"])

    setups = {}
    for v in variants:
        bare_n, s1, s2 = (max(round(x * args.scale), 1) for x in STEPS[v])
        config = fit_config(v, 0)
        with config.unlocked():
            config.train.steps = s2
        trainer = trainer_lib.Trainer(config, common.tempdir("mmjax_bench_bare_"))
        ds = pipeline.train_dataset(config, trainer.recipe.preprocess)
        cached = [ds[i] for i in range(8)] if "cached" in datas else None
        compiled = trainer.compile_step(trainer.abstract_batch(ds[0]))
        batch = parallel.global_batch(ds[0], trainer.batch_sharding)
        state = trainer.init_state()
        _, state = common.bare_step_seconds(compiled, state, batch, 3)  # warm-up
        setups[v] = {
            "config": config,
            "compiled": compiled,
            "batch": batch,
            "state": state,
            "cached": cached,
            "bare_n": bare_n,
            "s1": s1,
            "s2": s2,
            "num_params": trainer.num_params,
        }
    for v in variants:  # a warm-up fit: first-time imports, the init compile, the cache fill
        run_fit(fit_config(v, 0), 2, None)

    fits = collections.defaultdict(list)  # (v, data, w) -> [dict per repetition]
    for rep in range(args.reps):
        for v, data, w in settings:
            common.wait_quiet(args.wait_quiet)
            block_monitor = common.CpuMonitor()
            s = setups[v]
            sec, s["state"] = common.bare_step_seconds(s["compiled"], s["state"], s["batch"], s["bare_n"])
            config = fit_config(v, w)
            cached = s["cached"] if data == "cached" else None
            order = (s["s1"], s["s2"]) if rep % 2 == 0 else (s["s2"], s["s1"])
            walls, inloop = {}, None
            for steps in order:
                walls[steps], rec, _ = run_fit(config, steps, cached)
                if steps == s["s2"]:
                    inloop = inloop_seconds(rec.starts, config.train.log_every)
            other = block_monitor.summary()["other_cores"]
            fits[(v, data, w)].append(
                {
                    "bare": sec,
                    "t1": walls[s["s1"]],
                    "t2": walls[s["s2"]],
                    "diff": (walls[s["s2"]] - walls[s["s1"]]) / (s["s2"] - s["s1"]),
                    "inloop": inloop,
                    "other_cores": other,
                }
            )
            print(
                f"rep {rep} {v} data={data} workers={w}: bare {1e3 * sec:.2f} ms, "
                f"fit({s['s1']}) {walls[s['s1']]:.2f} s, fit({s['s2']}) {walls[s['s2']]:.2f} s, "
                f"inloop {1e3 * inloop if inloop else float('nan'):.2f} ms/step, "
                f"other load {other:.2f} cores",
                flush=True,
            )

    rows = []
    for (v, data, w), runs in fits.items():
        # Overheads are medians of per-repetition ratios: each loop time is divided by the bare
        # time measured just before it, so slow drifts in machine load cancel.
        s = setups[v]
        row = {
            "variant": v,
            "params": s["num_params"],
            "batch": s["config"].data.global_batch_size,
            "data": data,
            "num_workers": w,
            "S1,S2": f"{s['s1']},{s['s2']}",
            "bare_ms": 1e3 * common.median([r["bare"] for r in runs]),
            "bare_range_ms": common.spread([1e3 * r["bare"] for r in runs]),
            "loop_diff_ms": 1e3 * common.median([r["diff"] for r in runs]),
            "overhead_diff_pct": 100 * (common.median([r["diff"] / r["bare"] for r in runs]) - 1),
            "other_cores": common.median([r["other_cores"] for r in runs]),
        }
        ratios = [r["inloop"] / r["bare"] for r in runs if r["inloop"] is not None]
        if ratios:
            row.update(
                loop_inloop_ms=1e3 * common.median([r["inloop"] for r in runs if r["inloop"] is not None]),
                overhead_inloop_pct=100 * (common.median(ratios) - 1),
                inloop_overhead_range_pct=common.spread([100 * (x - 1) for x in ratios]),
            )
        row["goal_met"] = "yes" if row.get("overhead_inloop_pct", row["overhead_diff_pct"]) <= 3 else "no"
        rows.append(row)

    profiles = []
    if args.profile:
        for v, data, w in settings:
            s = setups[v]
            config = fit_config(v, w)
            common.wait_quiet(args.wait_quiet)
            busy0 = common.busy_seconds()
            sec, s["state"] = common.bare_step_seconds(s["compiled"], s["state"], s["batch"], s["bare_n"])
            bare_cpu = (common.busy_seconds() - busy0) / s["bare_n"]
            _, _, patches = run_fit(config, s["s2"], s["cached"] if data == "cached" else None, profile=True)
            prof = profile_breakdown(patches, config.train.log_every)
            if not prof:
                print(
                    f"profile {v}: S2={s['s2']} is too short for a steady-state window "
                    f"(needs > 2 * log_every = {2 * config.train.log_every} steps)",
                    flush=True,
                )
            prof = {
                "variant": v,
                "data": data,
                "num_workers": w,
                "bare_ms": 1e3 * sec,
                "bare_cpu_ms": 1e3 * bare_cpu,
                **prof,
            }
            if "cpu_ms" in prof:
                prof["extra_cpu_ms"] = prof["cpu_ms"] - prof["bare_cpu_ms"]
            profiles.append(prof)

    info, load = common.machine(), monitor.summary()
    print()
    print(f"machine: {info}")
    print(f"cpu use during the run: {load}")
    print(f"command: {common.command_line()}")
    print()
    print(
        common.markdown_table(
            rows,
            [
                "variant",
                "params",
                "batch",
                "data",
                "num_workers",
                "S1,S2",
                "bare_ms",
                "bare_range_ms",
                "loop_inloop_ms",
                "overhead_inloop_pct",
                "inloop_overhead_range_pct",
                "loop_diff_ms",
                "overhead_diff_pct",
                "other_cores",
                "goal_met",
            ],
        )
    )
    if profiles:
        cols = [
            "variant",
            "data",
            "num_workers",
            "bare_ms",
            "loop_ms",
            "bare_cpu_ms",
            "cpu_ms",
            "extra_cpu_ms",
            "data_wait_ms",
            "global_batch_ms",
            "dispatch_ms",
            "device_sync_ms",
            "metrics_write_ms",
            "progress_update_ms",
            "check_bad_steps_ms",
        ]
        print()
        print("profile (ms per step, steady-state window of one instrumented fit of S2 steps):")
        print(common.markdown_table(profiles, cols))
    common.emit(
        "loop_overhead",
        {
            "machine": info,
            "cpu": load,
            "reps": args.reps,
            "rows": rows,
            "profiles": profiles,
            "raw": {"/".join(map(str, k)): r for k, r in fits.items()},
        },
    )


if __name__ == "__main__":
    main()
