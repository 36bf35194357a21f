"""The launchers (launch/): each parses, and run against stand-ins for srun / scontrol / gcloud on
PATH it issues the right commands: one task per GPU, a requeue or a restart after a preemption or a
lost peer and none after a config error; the GKE manifest renders to a JobSet; the GPU flags are
flags this jaxlib knows."""

import json
import os
import shlex
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT

LAUNCH = os.path.join(ROOT, "launch")
SCRIPTS = ["common.sh", "gpu_env.sh", "gke.sh", "local_multiprocess.sh", "slurm_gpu.sbatch", "tpu_pod.sh"]


def stand_in(bin_dir, name, body):
    """An executable NAME on PATH that logs its argv (one JSON list per line) and runs BODY."""
    path = bin_dir / name
    log = bin_dir / "calls.jsonl"
    path.write_text(
        "#!/usr/bin/env bash\n"
        f"python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' {name} \"$@\" >> {log}\n" + body
    )
    path.chmod(0o755)


def calls(bin_dir):
    return [json.loads(line) for line in (bin_dir / "calls.jsonl").read_text().splitlines()]


def run(script, *args, bin_dir, env=None):
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", **(env or {})}
    return subprocess.run(
        ["bash", script, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", os.path.join(LAUNCH, script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_slurm_runs_one_task_per_gpu_and_requeues_after_a_preemption(tmp_path):
    header = [l.split()[1] for l in open(os.path.join(LAUNCH, "slurm_gpu.sbatch")) if l.startswith("#SBATCH")]
    opts = dict(o.lstrip("-").split("=", 1) for o in header if "=" in o)
    assert opts["ntasks-per-node"] == opts["gpus-per-node"] and "--requeue" in header
    srun_env = tmp_path / "srun_env.json"
    stand_in(
        tmp_path,
        "srun",
        f"python3 -c 'import json, os; json.dump(dict(os.environ), open(\"{srun_env}\", \"w\"))'\nexit ${{SRUN_RC:-0}}\n",
    )
    stand_in(tmp_path, "scontrol", "exit 0\n")
    args = ["launch/slurm_gpu.sbatch", "configs/mm1.py:1b", "/runs/mm1", "--config.train.steps=5"]
    env = {"SLURM_JOB_ID": "77", "SLURM_SUBMIT_DIR": ROOT}
    proc = run(*args, bin_dir=tmp_path, env={**env, "SRUN_RC": "143"})
    assert proc.returncode == 143, proc.stderr
    srun, requeue = calls(tmp_path)
    assert srun[0] == "srun" and "--kill-on-bad-exit=0" in srun
    assert srun[srun.index("mmjax") :] == [
        *(
            "mmjax",
            "train",
            "--config",
            "configs/mm1.py:1b",
            "--workdir",
            "/runs/mm1",
            "--config.train.steps=5",
        )
    ]
    assert requeue == ["scontrol", "requeue", "77"]
    seen = json.loads(srun_env.read_text())
    assert (
        seen["MMJAX_DISTRIBUTED"] == "auto"
        and "--xla_gpu_enable_latency_hiding_scheduler=true" in seen["XLA_FLAGS"]
    )
    for rc, restarts, requeued in (
        ("75", "0", True),
        ("2", "0", False),
        ("143", "20", False),
        ("0", "0", False),
    ):
        (tmp_path / "calls.jsonl").unlink()
        proc = run(*args, bin_dir=tmp_path, env={**env, "SRUN_RC": rc, "SLURM_RESTART_COUNT": restarts})
        assert proc.returncode == int(rc)
        assert (len(calls(tmp_path)) == 2) == requeued, (rc, restarts)


def test_tpu_pod_runs_on_every_worker_and_restarts_after_a_preemption(tmp_path):
    # the first run is preempted (143), the second finishes; describe says READY in between
    stand_in(
        tmp_path,
        "gcloud",
        f'if [[ $4 == describe ]]; then echo READY; exit 0; fi\n'
        f'n=$(grep -c \'"ssh"\' {tmp_path}/calls.jsonl); [[ $n -ge 2 ]] && exit 0 || exit 143\n',
    )
    extra = "--config.model.name=a b"
    proc = run("launch/tpu_pod.sh", "tpu1", "zone1", "configs/mm1.py:1b", "gs://b/r", extra, bin_dir=tmp_path)
    assert proc.returncode == 0, proc.stderr
    log = calls(tmp_path)
    assert [c[4] for c in log] == ["ssh", "describe", "ssh"] and "restart 1" in proc.stderr
    ssh = log[0]
    assert ssh[5:8] == ["tpu1", "--zone", "zone1"] and "--worker=all" in ssh
    remote = shlex.split(ssh[ssh.index("--command") + 1])
    assert remote[:3] == ["cd", "~/mmjax", "&&"]  # the hosts' checkout (MMJAX_REPO)
    assert remote[remote.index("MMJAX_DISTRIBUTED=auto") + 1 :] == [
        *("mmjax", "train", "--config", "configs/mm1.py:1b", "--workdir", "gs://b/r", extra)
    ]
    stand_in(tmp_path, "gcloud", "exit 2\n")  # a config error: not retried
    (tmp_path / "calls.jsonl").unlink()
    proc = run("launch/tpu_pod.sh", "tpu1", "zone1", "configs/mm1.py:1b", "gs://b/r", bin_dir=tmp_path)
    assert proc.returncode == 2 and len(calls(tmp_path)) == 1


def test_gke_renders_a_jobset_with_a_failure_policy(tmp_path):
    env = {"MMJAX_DRY_RUN": "1", "IMAGE": "img:1", "NUM_NODES": "2", "NAME": "run1"}
    proc = run(
        "launch/gke.sh", "configs/mm1.py:1b", "gs://b/r", '--config.x=a "b"', bin_dir=tmp_path, env=env
    )
    assert proc.returncode == 0, proc.stderr
    js = yaml.safe_load(proc.stdout)
    assert js["kind"] == "JobSet" and js["spec"]["failurePolicy"]["maxRestarts"] == 20
    job = js["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert job["parallelism"] == job["completions"] == 2 and job["completionMode"] == "Indexed"
    assert job["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [2, 3]
    pod = job["template"]["spec"]
    c = pod["containers"][0]
    assert c["args"] == ["--config", "configs/mm1.py:1b", "--workdir", "gs://b/r", '--config.x=a "b"']
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}
    assert env["MMJAX_COORDINATOR"] == "run1-workers-0-0.run1:1234" and env["MMJAX_NUM_PROCESSES"] == "2"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert c["command"][:2] == ["bash", "-c"] and 'exec mmjax train "$@"' in c["command"][2]
    assert "IMAGE" in run("launch/gke.sh", "c", "w", bin_dir=tmp_path, env={"IMAGE": ""}).stderr


def test_gpu_flags_are_flags_this_jaxlib_knows():
    """XLA ends a process on an unknown XLA_FLAGS entry, GPU flags included, even on a CPU."""
    flags = subprocess.run(
        ["bash", "-c", "source launch/gpu_env.sh && echo $XLA_FLAGS"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags
    env = {**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", "import jax; print(jax.devices())"], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0 and "CpuDevice" in proc.stdout, proc.stderr[-2000:]
    bad = {**env, "XLA_FLAGS": "--xla_gpu_not_a_flag=true"}
    assert (
        subprocess.run(
            [sys.executable, "-c", "import jax; jax.devices()"], env=bad, capture_output=True
        ).returncode
        != 0
    )
