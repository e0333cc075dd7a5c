#!/usr/bin/env bash
# SLURM, one process per GPU host (all local GPUs per process); JAX reads the SLURM environment.
#   sbatch --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 launch/slurm_gpu.sh \
#     --config=configs/mae.py --workdir=/shared/runs/mae_b16
#SBATCH --job-name=mim_jax
#SBATCH --signal=TERM@120
set -euo pipefail
srun python3 -m mim_jax.main "$@"
