#!/usr/bin/env bash
# Every method's paper recipe compiled for Cloud TPU slices on this machine (python -m mim_jax.aot:
# needs pip install "jax[tpu]", no TPU), then the table of docs/multihost.md ("Paper recipes on TPU
# slices") printed from the reports.
#
#   bench/tpu_recipes.sh [OUT_DIR]          # reports in OUT_DIR (default /tmp/tpu_recipes)
#   RECIPES="mae_b16 capi_l14" bench/tpu_recipes.sh  # only these rows (two lanes: run two of these)
#
# A report already in OUT_DIR is kept (delete it to compile again). Each compile takes minutes on
# a CPU core (ViT-B) to tens of minutes (ViT-H, CAE v2 L with its CLIP-L teacher).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/tpu_recipes}
mkdir -p "$out"

# name | config | slices ("topology" or "topology*slices") | extra flags
recipes=(
  "mae_b16|configs/mae.py|v5p-128 v6e-256 v6e-256*2|"
  "mae_l16|configs/mae.py:variant=L/16|v5p-128 v6e-256|"
  "mae_h14|configs/mae.py:variant=H/14|v5p-128 v6e-256|"
  "cae_v2_b|configs/cae_v2.py|v5p-128 v6e-256|"
  "cae_v2_l|configs/cae_v2.py:variant=L|v5p-128 v6e-256|"
  "capi_l14|configs/capi.py|v5p-64 v6e-256|"
  "beyond_masking_b16|configs/beyond_masking.py|v5p-128 v6e-256|"
  "cmae_b16|configs/cmae.py|v5p-128 v6e-256|"
  "finetune_b16|configs/finetune.py:init=random,pretrain=mae:variant=B/16|v5p-128 v6e-256|"
)

for row in "${recipes[@]}"; do
  IFS='|' read -r name config slices extra <<< "$row"
  if [[ -n ${RECIPES:-} && " $RECIPES " != *" $name "* ]]; then continue; fi
  for slice in $slices; do
    topology=${slice%\**} num_slices=1
    [[ $slice == *\** ]] && num_slices=${slice#*\*}
    report=$out/${name}@${topology}x${num_slices}.json
    [[ -f $report ]] && continue
    echo "== $name on $slice" >&2
    # Exit 1 (does not fit) still writes the report; anything else stops the script.
    status=0
    python3 -m mim_jax.aot "--config=$config" "--topology=$topology" "--num_slices=$num_slices" \
      "--json_out=$report" $extra || status=$?
    [[ $status -le 1 ]] || exit "$status"
  done
done

python3 - "$out" <<'PY'
import json, pathlib, sys
GIB = 2 ** 30
rows = ["| recipe | slice | batch (per chip) | compile | GiB per device (of HBM) | fits | XLA / analytic FLOPs "
        "| collectives per step, per device |", "|---|---|---|---|---|---|---|---|"]
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    r = json.loads(path.read_text())
    name = path.stem.split("@")[0]
    per_chip = r["batch_size"] / r["devices"]
    if "refused" in r:
        rows.append(f"| {name} | {r['topology']} | {r['batch_size']} ({per_chip:g}) | - | "
                    f"{(r['needed'] or 0) / GIB:.1f} (of {r['available'] / GIB:.1f}) | no | - | - |")
        continue
    moved = []
    for where, kinds in (("", r["collectives"]["in_slice"]), ("DCN ", r["collectives"]["across_slices"])):
        moved += [f"{where}{kind} {size / 2 ** 20:,.0f} MiB" for kind, (count, size) in sorted(kinds.items())]
    need = max(r["memory"]["total"], r.get("features", {}).get("memory", {}).get("total", 0))
    rows.append(f"| {name} | {r['topology']} | {r['batch_size']} ({per_chip:g}) | {r['compile_s']:.0f} s | "
                f"{need / GIB:.1f} (of {r['hbm_per_device'] / GIB:.0f}) | {'yes' if r['fits'] else 'no'} | "
                f"{r['xla_flops'] / r['analytic_flops']:.3f} | {', '.join(moved) or '-'} |")
print("\n".join(rows))
import importlib.metadata as md, os, platform
print(f"\n{os.cpu_count()}-core {platform.machine()} CPU, Python {platform.python_version()}, "
      f"jax {md.version('jax')}, libtpu {md.version('libtpu')}")
PY
