#!/usr/bin/env bash
# GKE: renders launch/gke_jobset.yaml and applies it (kubectl), or prints it (MMJAX_DRY_RUN=1).
#   IMAGE=us-docker.pkg.dev/P/mmjax/mmjax:latest NUM_NODES=4 \
#     launch/gke.sh configs/mm1.py:1b gs://bucket/runs/mm1 [--config.k=v ...]
# Change: IMAGE (an image with this repository at its working directory and mmjax installed; no
# default), NUM_NODES (4), GPUS_PER_NODE (8), ACCELERATOR (nvidia-h100-80gb), NAME (mmjax),
# MAX_RESTARTS (20), PORT (1234: process 0's coordinator).
set -euo pipefail
here=$(dirname "$0")
source "$here/common.sh"
config=$1; workdir=$2; shift 2
: "${IMAGE:?set IMAGE to the container image to run}"
export IMAGE NAME=${NAME:-mmjax} NUM_NODES=${NUM_NODES:-4} GPUS_PER_NODE=${GPUS_PER_NODE:-8}
export ACCELERATOR=${ACCELERATOR:-nvidia-h100-80gb} MAX_RESTARTS=${MAX_RESTARTS:-20} PORT=${PORT:-1234}
# the arguments as a YAML flow list of JSON strings (JSON is YAML), quoted whatever they hold
ARGS=$(python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' --config "$config" --workdir "$workdir" "$@")
export ARGS
manifest=$(python3 -c 'import os, string, sys; print(string.Template(open(sys.argv[1]).read()).substitute(os.environ))' "$here/gke_jobset.yaml")
if [[ -n ${MMJAX_DRY_RUN:-} ]]; then
  echo "$manifest"
  echo "# kubectl apply -f - <<< (the manifest above)"
else
  kubectl apply -f - <<<"$manifest"
fi
