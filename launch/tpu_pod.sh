#!/usr/bin/env bash
# Train on every worker of a Cloud TPU VM pod slice. The same command runs on all workers at once
# (`--worker=all`); jax.distributed finds the other workers by itself (JAX's Cloud TPU cluster
# detection, `distributed.auto_detect` in the config), so no coordinates are passed.
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh \
#       --config configs/shapes.py:ldm --workdir /mnt/runs/ldm --config.autoencoder_workdir=/mnt/runs/ae
#
# One-time setup (copies `git archive HEAD` of this checkout to every worker and installs it):
#
#   SETUP=1 TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh
#
# The workdir must be a filesystem every worker sees (a Filestore/NFS or gcsfuse mount): orbax
# writes one checkpoint from all hosts together. Optional environment: PROJECT, REMOTE_DIR
# (default ldm_jax, relative to the home directory on the workers).
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone}"
remote_dir=${REMOTE_DIR:-ldm_jax}
gcloud_args=(--zone="$ZONE" --worker=all)
if [[ -n "${PROJECT:-}" ]]; then
  gcloud_args+=(--project="$PROJECT")
fi

if [[ "${SETUP:-0}" == 1 ]]; then
  archive=$(mktemp --suffix=.tar.gz)
  git archive --format=tar.gz -o "$archive" HEAD
  gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:ldm_jax.tar.gz" "${gcloud_args[@]}"
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gcloud_args[@]}" --command="
    set -e; mkdir -p $remote_dir && tar -xzf ldm_jax.tar.gz -C $remote_dir && cd $remote_dir
    python3 -m venv .venv && .venv/bin/pip install -q -e . 'jax[tpu]==0.10.2'"
  rm -f "$archive"
  exit 0
fi

# Quote every training argument for the remote shell.
printf -v train_args ' %q' "$@"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gcloud_args[@]}" \
  --command="cd $remote_dir && .venv/bin/ldm-jax train$train_args"
