#!/usr/bin/env bash
# Start a training run on a GKE cluster with a GPU node pool, as the JobSet in jobset.yaml.
#
#   JOB_NAME=ldm IMAGE=us-docker.pkg.dev/PROJECT/ldm/ldm-jax:latest NUM_NODES=2 GPUS_PER_NODE=8 \
#   GPU_TYPE=nvidia-h100-80gb RUNS_PVC=runs launch/gke/launch.sh \
#       --config configs/shapes.py:ldm --workdir /runs/ldm --config.autoencoder_workdir=/runs/ae
#
# Needs kubectl pointed at the cluster, the JobSet controller installed
# (https://jobset.sigs.k8s.io/docs/installation/), an image with ldm_jax installed, and a
# ReadWriteMany PersistentVolumeClaim RUNS_PVC mounted at /runs. DRY_RUN=1 prints the manifest
# instead of applying it. Follow the logs with: kubectl logs -f jobs/$JOB_NAME-workers-0
set -euo pipefail

: "${JOB_NAME:?set JOB_NAME (lowercase letters, digits, -)}"
: "${IMAGE:?set IMAGE to a container image with ldm_jax installed}"
export JOB_NAME IMAGE
export NUM_NODES=${NUM_NODES:-2}
export GPUS_PER_NODE=${GPUS_PER_NODE:-8}
export GPU_TYPE=${GPU_TYPE:-nvidia-h100-80gb}
export RUNS_PVC=${RUNS_PVC:-runs}
printf -v TRAIN_ARGS " %q" "$@"
TRAIN_ARGS=${TRAIN_ARGS# }
export TRAIN_ARGS

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# Only these variables are substituted; anything else in the template is left alone.
# shellcheck disable=SC2016
fields='${JOB_NAME} ${IMAGE} ${NUM_NODES} ${GPUS_PER_NODE} ${GPU_TYPE} ${RUNS_PVC} ${TRAIN_ARGS}'
manifest=$(envsubst "$fields" <"$here/jobset.yaml")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%s\n' "$manifest"
else
  printf '%s\n' "$manifest" | kubectl apply -f -
fi
