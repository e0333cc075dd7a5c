#!/usr/bin/env bash
# Multi-host for real on one machine: N CPU processes x D devices each, jax.distributed over
# 127.0.0.1 with gloo collectives. Every process runs the same command, as on a pod.
#   launch/multiprocess_local.sh 2 4 --config=configs/mae.py:local --workdir=/tmp/mh --config.total_steps=4
set -euo pipefail
nproc=${1:?number of processes}; ndev=${2:?devices per process}; shift 2
port=${MIM_JAX_PORT:-$((20000 + RANDOM % 20000))}
pids=()
for ((i = 0; i < nproc; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=$ndev \
    python3 -m mim_jax.main "$@" --coordinator_address=127.0.0.1:$port \
    --num_processes=$nproc --process_id=$i &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
