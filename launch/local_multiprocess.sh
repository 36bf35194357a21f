#!/usr/bin/env bash
# Several JAX processes on one machine (CPU), the way a multi-host job runs:
#   launch/local_multiprocess.sh NPROC DEVICES_PER_PROC mmjax train --config ... --workdir ...
# Each process gets DEVICES_PER_PROC fake CPU devices (other XLA_FLAGS pass through); they meet at a local coordinator. SIGTERM
# to this script reaches every process (a preemption); each one's exit status is reported.
set -uo pipefail
nproc=$1; per=$2; shift 2
port=${MMJAX_PORT:-$((20000 + RANDOM % 20000))}
pids=()
for ((i = 0; i < nproc; i++)); do
  MMJAX_COORDINATOR=127.0.0.1:$port MMJAX_NUM_PROCESSES=$nproc MMJAX_PROCESS_ID=$i \
  XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$per" JAX_PLATFORMS=cpu "$@" &
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
status=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"; rc=$?
  while ((rc > 128)) && kill -0 "${pids[$i]}" 2>/dev/null; do wait "${pids[$i]}"; rc=$?; done  # a trapped signal
  echo "process $i exited $rc" >&2
  ((rc != 0)) && status=$rc
done
exit $status
