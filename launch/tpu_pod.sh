#!/usr/bin/env bash
# Cloud TPU pod: the same command on every worker; JAX detects the pod and initialises itself.
#   launch/tpu_pod.sh my-tpu us-central2-b --config=configs/mae.py:variant=L/16 --workdir=gs://bucket/run
set -euo pipefail
tpu=${1:?TPU name}; zone=${2:?zone}; shift 2
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
  "cd ~/mim_jax && pip install -q -r requirements.txt 'jax[tpu]==0.10.2' && python3 -m mim_jax.main $*"
