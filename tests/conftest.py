"""Test setup: 8 fake CPU devices (mesh tests), absl flags parsed (grain workers read
them), a helper that runs the `mmjax` command line in a fresh process, and one persistent XLA
compilation cache for the test processes and every process they start."""

import json
import os
import subprocess
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compile far more than they run: XLA's CPU backend at optimisation level 0 compiles them
# about 30% faster (the programs compute the same values).
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = f"{FAST_COMPILE} --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

from gcs import gcs_emulator  # noqa: E402,F401  (the local GCS fixture, for gs:// workdir tests)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "vit_shapes.py:tiny")


def xla_flags(devices):
    return f"{FAST_COMPILE} --xla_force_host_platform_device_count={devices}"


def run_mmjax(*args, devices=1, check=True, timeout=600, module="mmjax.cli", env=None):
    """Runs `python -m mmjax.cli ARGS` (or another module) with `devices` fake CPU devices."""
    env = {**os.environ, **(env or {}), "XLA_FLAGS": xla_flags(devices)}
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"mmjax {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(l) for l in f if l.strip()]
    return {r["step"]: r for r in rows if "loss" in r}


@pytest.fixture(scope="session", autouse=True)
def xla_compilation_cache(request, tmp_path_factory):
    """The test processes and the processes they start (`run_mmjax`, multi-process launches,
    notebooks) share one persistent XLA compilation cache for this session: a resumed or restarted
    run, the second launch of a multi-process run, a reference run and the next test's Trainer on
    the same config compile each program once (on 2 cores these compiles are most of a test;
    the in-process cache takes about a fifth off the CPU time of tests/test_unicode.py and
    tests/test_contract.py). A hit loads the executable of the identical program, so every run
    computes what it computed before. Under pytest-xdist the workers share the run's temporary
    root (pytest deletes old roots itself)."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if hasattr(request.config, "workerinput") else base
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(root / "xla-cache"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return os.environ["JAX_COMPILATION_CACHE_DIR"]


@pytest.fixture
def tiny_config():
    from mmjax import config as config_lib

    def make(*overrides):
        return config_lib.load(TINY, list(overrides))

    return make


def pytest_collection_modifyitems(config, items):
    """Tests marked `long` first, the longest (`long(weight)`, default 1) first, so under `-n 2`
    neither worker is left alone with a long test at the end."""

    def weight(item):
        mark = item.get_closest_marker("long")
        return 0 if mark is None else (mark.args[0] if mark.args else 1)

    items.sort(key=lambda item: -weight(item))
