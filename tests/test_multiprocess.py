"""Several JAX processes (fake CPU devices, gloo) as on a cluster: per-process batches assemble into
the same global batches as one device; a preemption (SIGTERM) is agreed through JAX's preemption
service; weights load straight onto FSDP shardings spread over processes, and export from them."""

import os
import re
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import ROOT, TINY, read_metrics, run_mmjax

from mmjax import config as config_lib
from mmjax import tree, weights
from mmjax.train import trainer as trainer_lib

MM1 = os.path.join(ROOT, "configs", "mm1.py")
LAUNCH = os.path.join(ROOT, "launch", "local_multiprocess.sh")


# The tiny config renders and caches 4096 records in every process (seconds each); 8 steps draw 256.
FEW = "--config.data.components.shapes.num_records=512"


def launch(nproc, per, *args, timeout=600):
    cmd = [LAUNCH, str(nproc), str(per), sys.executable, "-m", "mmjax.cli", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.long
def test_preemption_on_two_processes_saves_one_step_and_resumes(tmp_path):
    """SIGTERM reaches process 1 only (JAX's preemption service must see it, so mmjax installs no
    handler of its own there): both processes save the same step and exit 143; one process resumes
    the run, and it trains like one device reading the same two data shards. The two-process run's
    mesh is hybrid: data over the processes (`mesh_dcn`), fsdp within each."""
    multi = str(tmp_path / "multi")
    args = [
        "train",
        "--config",
        TINY,
        "--workdir",
        multi,
        "--config.train.steps=8",
        "--config.train.log_every=1",
        "--config.train.save_every=100",
        "--config.evals={}",
        "--config.mesh_dcn.data=2",  # data parallel across the two processes (hosts), fsdp within each
        "--config.mesh.data=1",
        "--config.mesh.fsdp=4",
        FEW,
    ]
    first = launch(
        2,
        4,
        *args,
        "--config.debug.kill_at_step=3",
        "--config.debug.kill_signal=SIGTERM",
        "--config.debug.kill_process=1",
    )
    assert first.returncode == 143, first.stderr[-3000:]
    assert "process 0 exited 143" in first.stderr and "process 1 exited 143" in first.stderr
    saved = re.findall(r"preempted: saved step (\d+)", first.stderr)
    assert len(saved) == 2 and saved[0] == saved[1], saved  # one agreed step, saved by both
    assert os.listdir(os.path.join(multi, "checkpoints")) == [saved[0]]
    data = set(os.listdir(os.path.join(multi, "checkpoints", saved[0], "data")))
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= data
    # resumed by one process holding the 8 devices: it reads both processes' data shards
    second = run_mmjax(*args, "--config.mesh_dcn.data=1", "--config.mesh.data=2", devices=8)
    assert "resumed from" in second.stderr

    one = str(tmp_path / "one")
    run_mmjax(
        "train",
        "--config",
        TINY,
        "--workdir",
        one,
        "--config.train.steps=8",
        "--config.train.log_every=1",
        "--config.evals={}",
        "--config.data.shards=2",  # the global batches of two processes
        FEW,
    )
    a, b = read_metrics(one), read_metrics(multi)
    assert sorted(b) == list(range(1, 9))
    np.testing.assert_allclose([a[s]["loss"] for s in a], [b[s]["loss"] for s in a], rtol=2e-5)


@pytest.mark.long(2)
def test_fine_tune_from_weights_and_export_on_two_processes(tmp_path):
    """The issue's command: MM1 SFT from an export on 2 processes x (data=2, fsdp=2). The export
    itself is written by 2 processes from arrays spread over both."""
    data = [f"--config.data.components.{n}.num_records=64" for n in ("caption", "interleaved", "text")]
    pt, export = str(tmp_path / "pt"), str(tmp_path / "export")
    run_mmjax(
        "train",
        "--config",
        f"{MM1}:tiny",
        "--workdir",
        pt,
        "--config.train.steps=3",
        "--config.evals={}",
        *data,
    )
    mesh = ["--config.mesh.data=2", "--config.mesh.fsdp=2"]
    proc = launch(2, 2, "export", "--config", f"{MM1}:tiny", "--workdir", pt, "--out", export, *mesh, *data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = config_lib.load(f"{MM1}:tiny", [o.removeprefix("--config.") for o in data])
    state, _, _, _ = trainer_lib.Trainer(cfg, pt).latest()
    exported, meta = weights.load(export)
    assert meta["kind"] == "vlm" and meta["step"] == 3
    want = tree.flat(jax.device_get(state.params))
    for n, v in tree.flat(exported).items():
        np.testing.assert_array_equal(v, want[n], err_msg=n)

    sft = [
        "train",
        "--config",
        f"{MM1}:tiny_sft",
        "--config.data.components.qa.num_records=64",
        "--config.train.steps=3",
        "--config.train.log_every=1",
        "--config.evals={}",
        f"--config.init.mm1.path={export}",
    ]
    proc = launch(2, 2, *sft, "--workdir", str(tmp_path / "sft2"), *mesh)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_mmjax(*sft, "--workdir", str(tmp_path / "sft1"), "--config.data.shards=2")
    a, b = read_metrics(tmp_path / "sft1"), read_metrics(tmp_path / "sft2")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    np.testing.assert_allclose([a[s]["loss"] for s in a], [b[s]["loss"] for s in a], rtol=2e-5)


@pytest.mark.long
def test_a_killed_process_stops_the_other_with_a_message_naming_it(tmp_path):
    """Process 1 is killed (SIGKILL) after step 5: process 0 exits PEER_LOST within the heartbeat
    timeout, saying in mmjax's words which process was lost and where the last checkpoint is."""
    args = ["train", "--config", TINY, "--workdir", str(tmp_path), "--config.evals={}", FEW]
    args += [
        "--config.train.steps=100",
        "--config.train.save_every=4",
        "--config.distributed.heartbeat_timeout_s=10",
    ]
    args += ["--config.debug.kill_at_step=5", "--config.debug.kill_process=1"]
    cmd = [LAUNCH, "2", "1", sys.executable, "-m", "mmjax.cli", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines, killed = [], None
    for line in proc.stderr:  # read as it comes: when the kill happened, by this clock
        lines.append(line)
        if killed is None and "debug.kill_at_step: SIGKILL at step 5" in line:
            killed = time.monotonic()
    proc.wait(timeout=300)
    stderr = "".join(lines)
    assert killed is not None and time.monotonic() - killed < 10 + 20, stderr[
        -3000:
    ]  # the timeout, and exits
    assert "process 1 exited 137" in stderr and "process 0 exited 75" in stderr, stderr[-3000:]
    ckpt = os.path.join(str(tmp_path), "checkpoints")
    assert (
        f"mmjax: process 0 of 2: process 1 stopped (no heartbeat within distributed.heartbeat_timeout_s); "
        f"this process stopped too. The last complete checkpoint is step 4 in {ckpt}"
    ) in stderr, stderr[-3000:]
    assert os.listdir(ckpt) == ["4"]
