"""Shared helpers for the benchmarks in this folder.

Nothing here imports jax at module import time: `setup()` must run first, because
`XLA_FLAGS` (fake CPU device count) is read when jax initialises its backend. Grain
workers are spawned processes that re-import the benchmark's `__main__`, so every
benchmark keeps its work under `if __name__ == "__main__":`.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "vit_shapes.py:tiny")

# Model variants: overrides on configs/vit_shapes.py:tiny. `tiny` is the config as shipped (its
# model changes when the config does); `mid` and `large` pin every model field, so their
# numbers stay comparable across config edits.
_PINNED = ["model.patch_size=8", "model.pool=map", "model.dtype=float32", "model.scan=False", "model.remat="]
VARIANTS = {
    "tiny": [],
    "mid": [*_PINNED, "model.width=128", "model.depth=4", "model.mlp_dim=512", "model.num_heads=4"]
    + ["data.global_batch_size=32"],
    "large": [*_PINNED, "model.width=256", "model.depth=6", "model.mlp_dim=1024", "model.num_heads=8"]
    + ["data.global_batch_size=64"],
}
# Data modes: `shipped` serves the shapes records the config caches in memory at start;
# `render` renders every record on the fly, in the input pipeline.
DATA = {"shipped": [], "render": ["data.components.shapes.cache=False"]}


def setup(devices: int | None = None, compilation_cache: bool = False) -> None:
    """Environment for a benchmark process; call before anything imports jax.

    devices: fake CPU device count (XLA_FLAGS). compilation_cache: JAX's persistent
    compilation cache in a fresh temporary folder, so every `Trainer.fit` after the first
    loads its step instead of compiling it.
    """
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if devices is not None:
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    from absl import flags  # grain's worker processes read absl flags

    flags.FLAGS.mark_as_parsed()
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    if compilation_cache:
        import jax

        jax.config.update("jax_compilation_cache_dir", tempdir("mmjax_bench_cache_"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser with the options every timing benchmark shares."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="shipped,render", help="comma list of " + ",".join(DATA))
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each measurement wait up to SECONDS for other load to stop",
    )
    return p


def tempdir(prefix: str) -> str:
    """A fresh temporary folder, removed when this process exits."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def load_config(variant: str = "tiny", data: str = "shipped", overrides=()):
    """configs/vit_shapes.py:tiny with a variant's and a data mode's overrides, then `overrides`.

    `config.evals` is emptied, so `Trainer.fit` runs no evaluator.
    """
    from mmjax import config as config_lib

    config = config_lib.load(TINY, [*VARIANTS[variant], *DATA[data], *overrides])
    with config.unlocked():
        for name in list(config.evals.keys()):
            del config.evals[name]
    return config


def machine() -> dict:
    model = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    commit = subprocess.run(
        ["git", "-C", ROOT, "describe", "--always", "--dirty"], check=False, capture_output=True, text=True
    ).stdout.strip()
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_GiB": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        **{name: metadata.version(name) for name in ("jax", "flax", "optax", "grain")},
        "commit": commit,
    }


def busy_seconds() -> float:
    """CPU seconds used on the whole machine since boot, all processes (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_seconds() -> float:
    """CPU seconds of this process and its reaped children (grain workers)."""
    return sum(sum(resource.getrusage(w)[:2]) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


class CpuMonitor:
    """How busy the machine was since this object was made, and how much of that was others.

    other_cores = (all CPU time on the machine - ours) / wall time. On the shared 2-core
    machine, other_cores > 0.1 means the measurement shared the cores with another workload.
    """

    def __init__(self):
        self._start = time.perf_counter(), busy_seconds(), own_seconds()

    def summary(self) -> dict:
        t0, busy0, own0 = self._start
        wall = max(time.perf_counter() - t0, 1e-9)
        busy, own = (busy_seconds() - busy0) / wall, (own_seconds() - own0) / wall
        return {
            "wall_s": round(wall, 1),
            "busy_cores": round(busy, 2),
            "ours_cores": round(own, 2),
            "other_cores": round(max(busy - own, 0.0), 2),
        }


def quiet(timeout: float, threshold: float = 0.2, window: float = 2.0) -> CpuMonitor:
    """Waits (at most `timeout` s) for the machine to use < `threshold` cores over `window` s.

    Call it while this process is idle, right before a measurement; the returned monitor
    then reports how much other load the measurement shared the machine with.
    """
    end = time.perf_counter() + timeout
    while time.perf_counter() < end:
        b0 = busy_seconds()
        time.sleep(window)
        if (busy_seconds() - b0) / window < threshold:
            break
    return CpuMonitor()


def median(xs):
    return statistics.median(xs)


def num(v) -> str:
    """A number for the tables: 4 significant digits, thousands separated from 1,000 up."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"


def spread(xs) -> str:
    """min..max of a list of floats, for the tables."""
    return f"{num(min(xs))}..{num(max(xs))}"


def bare_step(compiled, state, batch, steps: int):
    """A compiled (state-donating) step called `steps` times on one on-device batch.

    Blocks once at the end. Returns (seconds per step, machine CPU seconds per step, new
    state): the state is donated, so the caller must keep the new one.
    """
    import jax

    jax.block_until_ready(state)
    t0, busy0 = time.perf_counter(), busy_seconds()
    for _ in range(steps):
        state, metrics = compiled(state, {}, batch)
    jax.block_until_ready((state, metrics))
    return (time.perf_counter() - t0) / steps, (busy_seconds() - busy0) / steps, state


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(num(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def report(name: str, monitor: CpuMonitor, tables: list[tuple[str, list[dict], list[str]]], payload: dict):
    """Prints the machine, the command, the tables and one `BENCHMARK_JSON` line."""
    info = machine()
    command = "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    print(f"\nmachine: {info}\ncpu use during the run: {monitor.summary()}\ncommand: {command}")
    for title, rows, columns in tables:
        print(f"\n{title}\n{markdown_table(rows, columns)}")
    payload = {"benchmark": name, "machine": info, "command": command, **payload}
    print(f"BENCHMARK_JSON {json.dumps(payload, sort_keys=True)}", flush=True)


def cached_run(cmd: list[str], done: str) -> dict:
    """The JSON that `cmd` (one run of a study, in its own process) writes to `done`: run unless an
    earlier run left it (a study's rerun skips finished runs), with the run's wall time `seconds`."""
    if not os.path.exists(done):
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd[-2:])} failed:\n{proc.stderr[-4000:]}")
        with open(done) as f:
            res = json.load(f)
        res["seconds"] = round(time.perf_counter() - start)
        with open(done, "w") as f:
            json.dump(res, f, indent=1)
    with open(done) as f:
        return json.load(f)
