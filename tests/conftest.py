"""Test setup: 8 fake CPU devices (mesh tests), absl flags parsed (grain workers read
them), and a helper that runs the `mmjax` command line in a fresh process."""

import json
import os
import subprocess
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import pytest  # noqa: E402
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

from gcs import gcs_emulator  # noqa: E402,F401  (the local GCS fixture, for gs:// workdir tests)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "vit_shapes.py:tiny")


def run_mmjax(*args, devices=1, check=True, timeout=600, module="mmjax.cli", env=None):
    """Runs `python -m mmjax.cli ARGS` (or another module) with `devices` fake CPU devices."""
    env = {**os.environ, **(env or {}), "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
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


@pytest.fixture
def tiny_config():
    from mmjax import config as config_lib

    def make(*overrides):
        return config_lib.load(TINY, list(overrides))

    return make
