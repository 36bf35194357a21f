"""Multi-host start and what happens when a process is lost.

`initialize` starts JAX's multi-controller runtime (`jax.distributed.initialize`) when the launcher
or the config asks for it: JAX's own cluster detection (SLURM, TPU pods, GKE TPU, Open MPI) with
the explicit overrides of `config.distributed` or the launcher's MMJAX_* variables, and the
initialisation / heartbeat / shutdown timeouts from the config.

When a peer dies (or never arrives), JAX's coordination service ends every survivor with a C++
check failure within the heartbeat (or initialisation) timeout; no Python code runs after it. So
a multi-process `mmjax` runs as a thin supervisor around a child that does the work (`supervise`):
it passes signals on (a SIGTERM still reaches JAX's preemption service in the child), copies the
child's stderr through, and when the child was ended that way it says, in mmjax's words, which
process was lost, where the last complete checkpoint is, and how to resume; it exits
`PEER_LOST` (75, EX_TEMPFAIL), which the launchers' retry loops treat as "run again".
"""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys

PEER_LOST = 75
# the launchers' variables: the local multi-process launcher and GKE set them, SLURM and TPU pods
# leave them unset (JAX detects those clusters)
ENV = {
    "coordinator": "MMJAX_COORDINATOR",
    "num_processes": "MMJAX_NUM_PROCESSES",
    "process_id": "MMJAX_PROCESS_ID",
}
_UNSET = {"coordinator": "", "num_processes": 0, "process_id": -1}  # config.distributed's "not given"
_JAX_NAME = {
    "coordinator": "coordinator_address",
    "num_processes": "num_processes",
    "process_id": "process_id",
}
_ANNOUNCE = re.compile(r"^mmjax: distributed: process (\d+) of (\d+), coordinator (\S+)")


def settings(config):
    """`config.distributed`; a pipeline's (a config of stages) is its first stage's."""
    return config.distributed if "distributed" in config else config[config.stages[0]].distributed


def requested(config) -> bool:
    """Whether this run is one process of several: the config or the launcher says so."""
    d = settings(config)
    return bool(
        d.enabled
        or d.coordinator
        or os.environ.get("MMJAX_DISTRIBUTED") in ("1", "auto")
        or os.environ.get(ENV["coordinator"])
    )


def should_supervise(config) -> bool:
    """One process of several, not yet under its supervisor (`supervise` starts the child)."""
    return requested(config) and settings(config).supervise and not os.environ.get("MMJAX_SUPERVISED")


def init_kwargs(config) -> dict:
    """`jax.distributed.initialize` arguments: the config's overrides, else the launcher's
    variables, else (absent) JAX's cluster detection; always the config's timeouts."""
    d = settings(config)
    kw = dict(
        initialization_timeout=int(d.initialization_timeout_s),
        heartbeat_timeout_seconds=int(d.heartbeat_timeout_s),
        shutdown_timeout_seconds=int(d.shutdown_timeout_s),
    )
    for key, env in ENV.items():
        value = d[key] if d[key] != _UNSET[key] else os.environ.get(env, "")
        if value != "":
            kw[_JAX_NAME[key]] = type(_UNSET[key])(value)
    if d.local_device_ids:
        kw["local_device_ids"] = [int(i) for i in str(d.local_device_ids).split(",")]
    if d.cluster_detection:
        kw["cluster_detection_method"] = d.cluster_detection
    return kw


def initialize(config) -> None:
    """Starts multi-host JAX if `requested`; announces this process on stderr (the supervisor reads it)."""
    if not requested(config):
        return
    import jax

    jax.distributed.initialize(**init_kwargs(config))
    from jax._src import distributed as jax_distributed  # the address JAX resolved (detected clusters)

    address = jax_distributed.global_state.coordinator_address
    print(
        f"mmjax: distributed: process {jax.process_index()} of {jax.process_count()}, coordinator {address}",
        file=sys.stderr,
        flush=True,
    )


def supervise(argv: list[str], workdir: str) -> int:
    """Runs `mmjax ARGV` as a child process and explains how it ended if a peer was lost."""
    child = subprocess.Popen(
        [sys.executable, "-m", "mmjax.cli", *argv],
        env={**os.environ, "MMJAX_SUPERVISED": "1"},
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        preexec_fn=_die_with_parent,
    )
    forward = lambda sig, _: child.send_signal(sig)  # noqa: E731
    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    tail, who = collections.deque(maxlen=400), None
    try:
        for line in child.stderr:
            sys.stderr.write(line)
            tail.append(line)
            who = who or _ANNOUNCE.match(line)
        rc = child.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    message = diagnose("".join(tail), who.groups() if who else None, workdir) if rc else None
    if message:
        print(message, file=sys.stderr, flush=True)
        return PEER_LOST
    return rc if rc >= 0 else 128 - rc


def diagnose(stderr: str, who: tuple[str, str, str] | None, workdir: str) -> str | None:
    """mmjax's account of a run that JAX's coordination service ended, or None if it was not that."""
    if "JAX distributed service detected fatal errors" not in stderr:
        return None
    me = f"process {who[0]} of {who[1]}" if who else "this process"
    coordinator = f" at {who[2]}" if who else ""
    if "RegisterTask" in stderr and "DEADLINE_EXCEEDED" in stderr:
        what = (
            f"not every process reached the coordinator{coordinator} within distributed.initialization_timeout_s: "
            "check that all were started, with the same coordinator address and process count"
        )
    elif m := re.search(
        r"tasks are unhealthy \(stopped sending heartbeats\):(.*?)The tasks have crashed", stderr, re.S
    ):
        ids = re.findall(r"task:(\d+)", m.group(1)) or re.findall(r"\b(\d+)\b", m.group(1))
        lost = ", ".join(sorted(set(ids), key=int))
        plural = "es" if len(set(ids)) > 1 else ""
        what = f"process{plural} {lost} stopped (no heartbeat within distributed.heartbeat_timeout_s)"
    elif "leader task was preempted/died" in stderr or "Failed to send RPC to coordination service" in stderr:
        what = f"process 0, the coordinator{coordinator}, stopped"
    else:
        what = "a peer process or the coordinator failed (JAX's message above)"
    step = last_checkpoint(workdir)
    where = f"step {step[1]} in {step[0]}" if step else f"none yet in {workdir}"
    return (
        f"mmjax: {me}: {what}; this process stopped too. The last complete checkpoint is {where} "
        "(a checkpoint being written when a process stops is never used). To resume, start the same "
        "command on every process again; it continues from that checkpoint."
    )


def last_checkpoint(workdir: str) -> tuple[str, int] | None:
    """(folder, step) of the newest finished checkpoint under WORKDIR or its stages' folders."""
    from etils import epath

    best = None
    root = epath.Path(workdir)
    for folder in [root / "checkpoints", *(root.glob("*/checkpoints") if root.exists() else [])]:
        steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.exists() else []
        if steps and (best is None or folder.stat().mtime > best[2]):
            best = (str(folder), max(steps), folder.stat().mtime)
    return best[:2] if best else None


def _die_with_parent():
    """The child gets SIGKILL if the supervisor dies (Linux), so no orphan keeps a device."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
