#!/usr/bin/env bash
# TPU pod slice: the same command on every host; JAX finds the pod's coordinator itself.
#   launch/tpu_pod.sh TPU_NAME ZONE configs/vit_shapes.py:base gs://bucket/runs/vit [--config.k=v ...]
# Re-running it after a preemption resumes from the latest checkpoint in the workdir.
set -euo pipefail
tpu=$1; zone=$2; config=$3; workdir=$4; shift 4
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
  "cd ~/mmjax && MMJAX_DISTRIBUTED=auto mmjax train --config $config --workdir $workdir $*"
