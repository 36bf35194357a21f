"""Two JAX processes (4 fake CPU devices each, gloo) train like one device: per-process
batches assemble into the same global batches, and the checkpoint is written jointly."""

import os
import subprocess
import sys

import numpy as np

from conftest import ROOT, TINY, read_metrics, run_mmjax

ARGS = ["--config.train.steps=6", "--config.train.log_every=1", "--config.evals.val.num_examples=64"]


def test_two_processes_match_one_device(tmp_path):
    multi = str(tmp_path / "multi")
    cmd = [
        os.path.join(ROOT, "launch", "local_multiprocess.sh"),
        "2",
        "4",
        sys.executable,
        "-m",
        "mmjax.cli",
        "train",
        "--config",
        TINY,
        "--workdir",
        multi,
        *ARGS,
        "--config.mesh.data=2",
        "--config.mesh.fsdp=4",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_mmjax("train", "--config", TINY, "--workdir", str(tmp_path / "one"), *ARGS)
    a, b = read_metrics(tmp_path / "one"), read_metrics(multi)
    assert sorted(b) == list(range(1, 7))
    np.testing.assert_allclose([a[s]["loss"] for s in a], [b[s]["loss"] for s in a], rtol=2e-5)
    assert os.path.isdir(os.path.join(multi, "checkpoints", "6", "state"))
    data_states = set(os.listdir(os.path.join(multi, "checkpoints", "6", "data")))
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= data_states
