"""Multi-host start without starting it: JAX's arguments from the config and the launcher's
variables, the hybrid (DCN x ICI) mesh shapes and their errors, and the supervisor's account of the
ways JAX's coordination service ends a run (texts as JAX 0.10 prints them)."""

import os

import pytest
from conftest import ROOT, TINY

from mmjax import config as config_lib, distributed
from mmjax.config import ConfigError

HEARTBEAT = """E1207 00:55:53.922025 coordination_service.cc:1549] Use error polling to propagate the following error to all tasks: UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):
1
The tasks have crashed. Check the task logs for an earlier error, or scheduler events (e.g. preemption, eviction) to debug further.
F1207 00:55:53.922640 client.h:80] Terminating process because the JAX distributed service detected fatal errors. This most likely indicates that another task died
*** Check failure stack trace: ***
"""
LEADER = """F1207 00:56:41.397842 client.h:80] Terminating process because the JAX distributed service detected fatal errors. This most likely indicates that another task died; see the other task logs for more details. absl::Status: UNAVAILABLE: Failed to send RPC to coordination service. Either the leader task was preempted/died/restarted unexpectedly or this task is experiencing network issues.
"""
NEVER = """F1207 00:53:37.772209 client.h:80] Terminating process because the JAX distributed service detected fatal errors. This most likely indicates that another task died; see the other task logs for more details. absl::Status: DEADLINE_EXCEEDED: Deadline Exceeded

RPC: /xla.coordination.CoordinationService/RegisterTask
"""
WHO = ("1", "4", "10.0.0.1:1234")


def test_diagnose_names_the_lost_process_and_the_last_checkpoint(tmp_path):
    (tmp_path / "checkpoints" / "8").mkdir(parents=True)
    (tmp_path / "checkpoints" / "12.orbax-checkpoint-tmp-3").mkdir()  # half-written: never named
    msg = distributed.diagnose(HEARTBEAT, ("0", "2", "h:1"), str(tmp_path))
    assert msg.startswith(
        "mmjax: process 0 of 2: process 1 stopped (no heartbeat within distributed.heartbeat_timeout_s)"
    )
    assert f"step 8 in {tmp_path / 'checkpoints'}" in msg and "start the same command on every process" in msg
    tasks = HEARTBEAT.replace(
        "\n1\n", "\n/job:jax_worker/replica:0/task:3\n/job:jax_worker/replica:0/task:2\n"
    )
    assert "processes 2, 3 stopped" in distributed.diagnose(tasks, WHO, str(tmp_path))
    assert "process 0, the coordinator at 10.0.0.1:1234, stopped" in distributed.diagnose(
        LEADER, WHO, str(tmp_path)
    )
    never = distributed.diagnose(NEVER, WHO, str(tmp_path / "new"))
    assert (
        "not every process reached the coordinator at 10.0.0.1:1234 within distributed.initialization_timeout_s"
        in never
    )
    assert f"none yet in {tmp_path / 'new'}" in never
    assert (
        distributed.diagnose("Traceback (most recent call last):\nValueError: x\n", WHO, str(tmp_path))
        is None
    )


def test_last_checkpoint_of_a_pipeline_is_its_newest_stage(tmp_path):
    (tmp_path / "stage1" / "checkpoints" / "300").mkdir(parents=True)
    (tmp_path / "stage2" / "checkpoints" / "20").mkdir(parents=True)
    assert distributed.last_checkpoint(str(tmp_path)) == (str(tmp_path / "stage2" / "checkpoints"), 20)
    assert distributed.last_checkpoint(str(tmp_path / "missing")) is None


def test_initialize_arguments_come_from_the_config_then_the_launcher(monkeypatch):
    for env in distributed.ENV.values():
        monkeypatch.delenv(env, raising=False)
    monkeypatch.delenv("MMJAX_DISTRIBUTED", raising=False)
    cfg = config_lib.load(TINY, ["distributed.heartbeat_timeout_s=15"])
    assert not distributed.requested(cfg)  # one process: nothing to start
    pipeline = config_lib.load(os.path.join(ROOT, "configs", "mm1.py:tiny_pipeline"), [])
    assert (
        not distributed.requested(pipeline)
        and distributed.init_kwargs(pipeline)["heartbeat_timeout_seconds"] == 100
    )
    assert distributed.init_kwargs(cfg) == dict(
        initialization_timeout=300, heartbeat_timeout_seconds=15, shutdown_timeout_seconds=300
    )  # the rest is JAX's cluster detection (SLURM, TPU pods, GKE TPU, Open MPI)
    monkeypatch.setenv("MMJAX_COORDINATOR", "10.0.0.1:1234")
    monkeypatch.setenv("MMJAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("MMJAX_PROCESS_ID", "3")
    assert distributed.requested(cfg)
    kw = distributed.init_kwargs(cfg)
    assert (kw["coordinator_address"], kw["num_processes"], kw["process_id"]) == ("10.0.0.1:1234", 4, 3)
    cfg = config_lib.load(
        TINY,
        [
            "distributed.process_id=0",
            "distributed.local_device_ids=0,1",
            "distributed.cluster_detection=slurm",
        ],
    )
    kw = distributed.init_kwargs(cfg)
    assert (kw["process_id"], kw["local_device_ids"], kw["cluster_detection_method"]) == (0, [0, 1], "slurm")


def test_hybrid_mesh_shapes_and_their_errors():
    cfg = config_lib.load(TINY, ["mesh_dcn.data=4", "mesh.data=1", "mesh.fsdp=-1"])
    within, across = config_lib.mesh_shapes(cfg, 32, num_granules=4)
    assert within == {"data": 1, "fsdp": 8, "expert": 1, "tensor": 1} and across["data"] == 4
    assert config_lib.validate(cfg, 32, num_processes=4, num_granules=4)["data"] == 4
    with pytest.raises(ConfigError, match=r"mesh_dcn .* spans 4 slices or hosts, but this run has 2"):
        config_lib.mesh_shapes(cfg, 32, num_granules=2)
    bad = config_lib.load(TINY, [])
    with bad.unlocked():
        bad.mesh_dcn.pipe = 2
    with pytest.raises(ConfigError, match=r"mesh_dcn names axes \['pipe'\]"):
        config_lib.mesh_shapes(bad, 8)
