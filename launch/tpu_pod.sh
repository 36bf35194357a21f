#!/usr/bin/env bash
# TPU pod slice: the same command on every host (`gcloud ... ssh --worker=all`); JAX finds the
# pod's coordinator itself. After a preemption, a lost host or a lost peer it waits for the TPU to
# be READY again and starts the run again; the run resumes from its last checkpoint.
#   launch/tpu_pod.sh TPU_NAME ZONE configs/mm1.py:1b gs://bucket/runs/mm1 [--config.k=v ...]
#   MMJAX_DRY_RUN=1 launch/tpu_pod.sh ...   # print the commands, run nothing
# Change: MMJAX_REPO (the checkout on the hosts, default ~/mmjax), MMJAX_MAX_RESTARTS (default 20),
# MMJAX_READY_WAIT_S (how long to wait for the TPU to come back, default 3600), GCLOUD_FLAGS (e.g.
# "--project P --tunnel-through-iap").
set -uo pipefail
here=$(dirname "$0")
source "$here/common.sh"
tpu=$1; zone=$2; config=$3; workdir=$4; shift 4
remote="cd ${MMJAX_REPO:-~/mmjax} && MMJAX_DISTRIBUTED=auto $(quoted mmjax train --config "$config" --workdir "$workdir" "$@")"
read -ra gflags <<<"${GCLOUD_FLAGS:-}"
for ((attempt = 0; ; attempt++)); do
  run gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" "${gflags[@]}" --worker=all --command "$remote"
  rc=$?
  if ((rc == 0)) || ! retryable $rc || ((attempt >= ${MMJAX_MAX_RESTARTS:-20})); then exit $rc; fi
  echo "mmjax: the run exited $rc; waiting for $tpu to be READY, then restart $((attempt + 1))" >&2
  for ((waited = 0; waited < ${MMJAX_READY_WAIT_S:-3600}; waited += 30)); do
    state=$(run gcloud compute tpus tpu-vm describe "$tpu" --zone "$zone" "${gflags[@]}" --format='value(state)')
    [[ $state == READY || -n ${MMJAX_DRY_RUN:-} ]] && break
    sleep 30
  done
done
