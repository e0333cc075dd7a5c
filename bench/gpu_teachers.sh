#!/usr/bin/env bash
# The throughput matrix of the teacher methods (CAPI, CAE v2) on one GPU, in one run (about 8
# minutes on an H100/H200): the official CAPI step first, then each JAX variant on the same device,
# then a short profile of CAPI L/14. Ratios are only meaningful between rows of the same run.
#
#   bash bench/gpu_teachers.sh [OUT_DIR]
#
# The official CAPI step (bench/capi_torch_step.py) needs a checkout of facebookresearch/capi at
# bench/ref/capi (git-ignored: `git clone https://github.com/facebookresearch/capi bench/ref/capi`);
# it is skipped otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/gpu_teachers}
mkdir -p "$OUT"
export TF_CPP_MIN_LOG_LEVEL=2
FIELDS="images_per_s|ms_per_step|mfu|tflops|compile_s|device|memory"
run() {  # name, then the bench arguments; each row's output is kept, a failing row does not stop the matrix
  local name=$1; shift
  echo "== $name"
  timeout 300 python -m mim_jax.bench "$@" 2>&1 | grep -E "$FIELDS" | tee "$OUT/$name.txt" \
    || echo "   (failed: see python -m mim_jax.bench $*)"
}
if [[ -f bench/ref/capi/model.py ]]; then
  echo "== official CAPI step (L/14, batch 256, torch.compile)"
  timeout 300 python bench/capi_torch_step.py --variant=L/14 --batch=256 2>&1 | tail -1 | tee "$OUT/capi_torch.txt"
fi
L14="--config=configs/capi.py --config.input.batch_size=256"
run capi_l14 $L14                                              # subset drop path, chunk 32 (defaults)
run capi_l14_naive_drop_path $L14 --config.model.drop_path_form=naive
run capi_l14_chunk64 $L14 --config.method.sinkhorn_chunk=64
run capi_l14_chunk256 $L14 --config.method.sinkhorn_chunk=256
run capi_l14_batch512 --config=configs/capi.py --config.input.batch_size=512   # the paper's per-GPU batch
run capi_b14 --config=configs/capi.py:variant=B/14 --config.input.batch_size=256
# CAE v2's CLIP-B/16 teacher: random weights of the real shape (speed does not depend on the values;
# the device has no network to fetch openai/clip-vit-base-patch16).
python - "$OUT/clip_b16" <<'PY'
import sys, transformers
config = transformers.CLIPConfig(vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                    num_attention_heads=12, image_size=224, patch_size=16),
                                 projection_dim=512)
transformers.CLIPModel(config).save_pretrained(sys.argv[1], safe_serialization=True)
PY
run cae_v2_b16 --config=configs/cae_v2.py:teacher="$OUT/clip_b16" --config.input.batch_size=256
# A short profile of the default variant: a TensorBoard trace of 5 steps under $OUT/profile.
run capi_l14_profile $L14 --steps=5 --profile_dir="$OUT/profile"
echo "rows in $OUT"
