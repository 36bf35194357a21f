"""Shared helpers for the benchmarks in this folder.

Nothing here imports jax at module import time: `setup()` must run first, because
`XLA_FLAGS` (fake CPU device count) is read when jax initialises its backend. Grain
workers are spawned processes that re-import the benchmark's `__main__`, so every
benchmark keeps its work under `if __name__ == "__main__":`.
"""

from __future__ import annotations

import atexit
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "vit_shapes.py:tiny")

# Model variants: overrides on configs/vit_shapes.py:tiny. `tiny` is the config as shipped (its
# model changes when the config does); `mid` and `large` pin every model field, so their
# numbers stay comparable across config edits. Step times on the 2-core CPU of BENCHMARKS.md:
# tiny (patch 4, width 64, depth 2, MAP head) ~35 ms; mid ~50 ms; large ~340 ms.
_PINNED = ["model.patch_size=8", "model.pool=map", "model.dtype=float32", "model.scan=False", "model.remat="]
VARIANTS = {
    "tiny": [],
    "mid": [
        *_PINNED,
        "model.width=128",
        "model.depth=4",
        "model.mlp_dim=512",
        "model.num_heads=4",
        "data.global_batch_size=32",
    ],
    "large": [
        *_PINNED,
        "model.width=256",
        "model.depth=6",
        "model.mlp_dim=1024",
        "model.num_heads=8",
        "data.global_batch_size=64",
    ],
}


def setup(devices: int | None = None, compilation_cache: bool = False) -> None:
    """Environment for a benchmark process; call before anything imports jax.

    devices: fake CPU device count (XLA_FLAGS). compilation_cache: turn on JAX's persistent
    compilation cache in a fresh temporary folder, so repeated compiles of the same program in
    this process (one per `Trainer.fit`) are cache hits: it shrinks the fixed cost of a fit,
    and with it the noise of a difference of two fits.
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


def tempdir(prefix: str) -> str:
    """A fresh temporary folder, removed when this process exits."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def load_config(variant: str = "tiny", overrides=(), evals: bool = False):
    """configs/vit_shapes.py:tiny with a variant's overrides, then `overrides`.

    evals=False removes `config.evals`, so `Trainer.fit` runs no evaluator (it runs them only
    when `recipe.evaluators()` is non-empty, and vit_shapes builds one per `config.evals` key).
    """
    from mmjax import config as config_lib

    config = config_lib.load(TINY, [*VARIANTS[variant], *overrides])
    if not evals:
        with config.unlocked():
            for name in list(config.evals.keys()):
                del config.evals[name]
    return config


def machine() -> dict:
    import jax

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "python": platform.python_version(),
    }


class CpuMonitor:
    """How busy the machine was during a benchmark, and how much of that was someone else.

    busy: all CPU time used on the machine (/proc/stat), in cores on average; ours: this
    process and its reaped children (getrusage); other = busy - ours. On a shared 2-core
    machine `other` > 0.1 core means the numbers are contaminated by another workload.
    """

    def __init__(self):
        self._start = self._sample()

    @staticmethod
    def _sample():
        import resource

        busy = 0.0
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
            ticks = os.sysconf("SC_CLK_TCK")
            idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
            busy = (sum(fields[:8]) - idle) / ticks
        except (OSError, ValueError):
            pass
        own = sum(
            resource.getrusage(w).ru_utime + resource.getrusage(w).ru_stime
            for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
        )
        return time.perf_counter(), busy, own

    def summary(self) -> dict:
        t1, busy1, own1 = self._sample()
        t0, busy0, own0 = self._start
        wall = max(t1 - t0, 1e-9)
        busy, own = (busy1 - busy0) / wall, (own1 - own0) / wall
        return {
            "wall_s": round(wall, 1),
            "busy_cores": round(busy, 2),
            "ours_cores": round(own, 2),
            "other_cores": round(max(busy - own, 0.0), 2),
            "loadavg": os.getloadavg(),
        }


def busy_seconds() -> float:
    """CPU seconds used on the whole machine since boot, all processes (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def wait_quiet(timeout: float, threshold: float = 0.2, window: float = 2.0) -> float:
    """Waits (at most `timeout` s) until the machine uses < `threshold` cores over `window` s.

    Call it between measurements, while this process is idle, so that a measurement does not
    start while another workload (tests, another benchmark) is running. Returns the busy cores
    of the last window; 0 and no wait when timeout <= 0.
    """
    if timeout <= 0:
        return 0.0
    end = time.perf_counter() + timeout
    busy = float("inf")
    while time.perf_counter() < end:
        b0 = busy_seconds()
        time.sleep(window)
        busy = (busy_seconds() - b0) / window
        if busy < threshold:
            break
    return busy


def median(xs):
    return statistics.median(xs)


def spread(xs) -> str:
    """min..max of a list of floats, for the tables."""
    return f"{min(xs):.3g}..{max(xs):.3g}"


def block(tree):
    import jax

    jax.block_until_ready(tree)
    return tree


def bare_step_seconds(compiled, state, batch, steps: int):
    """Seconds per call of a compiled (state-donating) step on one on-device batch.

    Calls it `steps` times in a tight Python loop and blocks once at the end. Returns
    (seconds_per_step, new_state): the state is donated, so the caller must keep the new one.
    """
    block(state)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch)
    block((state, metrics))
    return (time.perf_counter() - t0) / steps, state


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def emit(name: str, payload: dict) -> None:
    """The machine-readable result: one JSON line, prefixed so it is easy to grep."""
    print(f"BENCHMARK_JSON {json.dumps({'benchmark': name, **payload}, sort_keys=True)}", flush=True)


def command_line() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
