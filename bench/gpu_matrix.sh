#!/usr/bin/env bash
# The throughput matrix of the MAE family on one GPU, in one run (about 8 minutes on an H100/H200):
# the PyTorch reference step first, then each JAX variant on the same device, then a short profile
# of the default variant. Ratios are only meaningful between rows of the same run.
#
#   bash bench/gpu_matrix.sh [OUT_DIR]
#
# The PyTorch reference (timm blocks, SDPA, fused AdamW, torch.compile) is not part of this project:
# put a copy at bench/ref/mae_torch.py (git-ignored) to include it; it is skipped otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/gpu_matrix}
mkdir -p "$OUT"
export TF_CPP_MIN_LOG_LEVEL=2
run() {  # name, then the bench arguments; each row's output is kept, a failing row does not stop the matrix
  local name=$1; shift
  echo "== $name"
  timeout 300 python -m mim_jax.bench "$@" 2>&1 | grep -E "images_per_s|ms_per_step|mfu|tflops|compile_s|device" \
    | tee "$OUT/$name.txt" || echo "   (failed: see python -m mim_jax.bench $*)"
}
if [[ -f bench/ref/mae_torch.py ]]; then
  echo "== torch reference (MAE-B/16, batch 256)"; timeout 300 python bench/ref/mae_torch.py 256 2>&1 | tee "$OUT/torch.txt"
fi
B16="--config=configs/mae.py:variant=B/16 --config.input.batch_size=256"
run mae_b16_auto $B16                                         # attention chosen automatically (cuDNN)
run mae_b16_xla $B16 --config.model.attention_impl=xla
run mae_b16_remat $B16 --config.model.remat=True
run mae_l16_auto --config=configs/mae.py:variant=L/16 --config.input.batch_size=256
run bm_b16_auto --config=configs/beyond_masking.py:variant=B/16 --config.input.batch_size=256
run cmae_b16_auto --config=configs/cmae.py:variant=B/16 --config.input.batch_size=256
# A short profile of the default variant: a TensorBoard trace of 5 steps under $OUT/profile.
run mae_b16_profile $B16 --steps=5 --profile_dir="$OUT/profile"
echo "rows in $OUT"
