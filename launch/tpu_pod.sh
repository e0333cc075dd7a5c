#!/usr/bin/env bash
# Cloud TPU pod: copies this checkout to every worker, installs it, and runs the same
# `python3 -m mim_jax.main ARGS` on all of them (JAX detects the pod and initialises itself).
#
#   launch/tpu_pod.sh [OPTIONS] TPU_NAME ZONE MAIN_ARGS...
#   launch/tpu_pod.sh my-tpu us-central2-b --config=configs/mae.py:variant=L/16 --workdir=gs://bucket/run
#   launch/tpu_pod.sh --queued --spot --accelerator_type=v4-64 my-tpu us-central2-b \
#       --config=configs/mae.py --workdir=gs://bucket/run --config.mesh='[("data",-1),("fsdp",4)]'
#
# Options (before TPU_NAME; everything after ZONE goes to mim_jax.main, quoted as given):
#   --queued                 create the TPU through a queued resource (if it is not READY) and,
#                            when it is preempted or deleted, recreate it and relaunch: the trainer
#                            resumes from the newest checkpoint in the workdir
#   --spot                   spot capacity for the queued resource (implies --queued)
#   --accelerator_type=T     e.g. v4-32, v5litepod-64 (needed with --queued)
#   --runtime_version=V      TPU VM image (default tpu-ubuntu2204-base)
#   --project=P              gcloud project (default: gcloud's configured one)
#   --max_attempts=N         launches before giving up (default 20)
#   --done_marker=PATH       stop as soon as PATH exists (e.g. gs://bucket/run/DONE); optional
#   --remote_dir=DIR         checkout directory on the workers (default mim_jax, under ~)
#   --dry_run                print every command (gcloud, tar) instead of running it
#   --check                  first compile the run's train step for --accelerator_type on this
#                            machine (python -m mim_jax.aot, needs pip install "jax[tpu]", no TPU)
#                            and stop, creating nothing, when it does not fit
# The run is finished when the command exits 0 on every worker (or the done marker appears). A
# failure on a TPU that is still READY is a real failure: the script stops with its status.
set -euo pipefail

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit "${1:-2}"; }
retry_sleep=${TPU_POD_RETRY_SLEEP:-30}   # seconds between a preemption and the relaunch

dry_run=0 queued=0 spot=0 accelerator_type="" runtime_version=tpu-ubuntu2204-base project=""
max_attempts=20 done_marker="" remote_dir=mim_jax check=0
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --dry_run) dry_run=1 ;;
    --check) check=1 ;;
    --queued) queued=1 ;;
    --spot) spot=1 queued=1 ;;
    --accelerator_type=*) accelerator_type=${1#*=} ;;
    --runtime_version=*) runtime_version=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --max_attempts=*) max_attempts=${1#*=} ;;
    --done_marker=*) done_marker=${1#*=} ;;
    --remote_dir=*) remote_dir=${1#*=} ;;
    -h|--help) usage 0 ;;
    *) echo "Unknown option $1 (script options go before TPU_NAME)" >&2; usage ;;
  esac
  shift
done
[[ $# -ge 2 ]] || usage
tpu=$1 zone=$2; shift 2
if [[ ( $queued == 1 || $check == 1 ) && -z $accelerator_type ]]; then
  echo "--queued/--spot/--check need --accelerator_type=..." >&2; exit 2
fi
if [[ ! $remote_dir =~ ^[A-Za-z0-9_][A-Za-z0-9._-]*$ ]]; then
  echo "--remote_dir must be a plain directory name under ~" >&2; exit 2
fi
repo=$(cd "$(dirname "$0")/.." && pwd)
archive=/tmp/mim_jax_${tpu}.tgz
gcloud_flags=(--zone "$zone")
[[ -n $project ]] && gcloud_flags+=(--project "$project")

# Every argument of mim_jax.main, shell-quoted for the remote shell (spaces, quotes, brackets).
main_args=""
[[ $# -gt 0 ]] && main_args=$(printf ' %q' "$@")

run() {  # prints (dry run) or runs a command
  if [[ $dry_run == 1 ]]; then printf '%q' "$1"; shift; printf ' %q' "$@"; echo; else "$@"; fi
}

query_state() {  # sets $state: READY, PREEMPTED, CREATING, ...; MISSING when there is no such TPU
  if [[ $dry_run == 1 ]]; then
    run gcloud compute tpus tpu-vm describe "$tpu" "${gcloud_flags[@]}" --format='value(state)'
    state=MISSING   # a dry run shows the creation path
    return
  fi
  state=$(gcloud compute tpus tpu-vm describe "$tpu" "${gcloud_flags[@]}" --format='value(state)' \
            2>/dev/null) || state=MISSING
}

qr_describe() {
  run gcloud compute tpus queued-resources describe "$tpu" "${gcloud_flags[@]}" --format='value(state.state)'
}

create_tpu() {  # (re)creates the queued resource (named like the TPU) and waits until it is ACTIVE
  local qr_state=MISSING
  if [[ $dry_run == 1 ]]; then qr_describe; else qr_state=$(qr_describe 2>/dev/null) || qr_state=MISSING; fi
  case $qr_state in
    ACCEPTED|WAITING_FOR_RESOURCES|PROVISIONING|CREATING) ;;  # still queued: keep its place
    *)
      [[ $qr_state == MISSING ]] \
        || run gcloud compute tpus queued-resources delete "$tpu" "${gcloud_flags[@]}" --force --quiet
      local create=(gcloud compute tpus queued-resources create "$tpu" --node-id "$tpu" "${gcloud_flags[@]}"
                    --accelerator-type "$accelerator_type" --runtime-version "$runtime_version")
      [[ $spot == 1 ]] && create+=(--spot)
      run "${create[@]}" ;;
  esac
  [[ $dry_run == 1 ]] && return
  while qr_state=$(qr_describe 2>/dev/null || echo MISSING); [[ $qr_state != ACTIVE ]]; do
    case $qr_state in
      FAILED|SUSPENDED|MISSING) echo "Queued resource $tpu is $qr_state." >&2; return 1 ;;
      *) echo "Queued resource $tpu: $qr_state; waiting..."; sleep "$retry_sleep" ;;
    esac
  done
}

copy_code() {  # this checkout (tracked and untracked, not ignored files) to every worker
  if [[ $dry_run == 1 ]]; then
    echo "(cd $(printf %q "$repo") && git ls-files -z --cached --others --exclude-standard" \
         "| tar --null --ignore-failed-read -T - -czf $(printf %q "$archive"))"
  else
    (cd "$repo" && git ls-files -z --cached --others --exclude-standard \
       | tar --null --ignore-failed-read -T - -czf "$archive")
  fi
  run gcloud compute tpus tpu-vm scp "$archive" "$tpu:/tmp/mim_jax.tgz" "${gcloud_flags[@]}" --worker=all
  run gcloud compute tpus tpu-vm ssh "$tpu" "${gcloud_flags[@]}" --worker=all --command \
    "rm -rf ~/$remote_dir.new && mkdir -p ~/$remote_dir.new && tar -xzf /tmp/mim_jax.tgz -C ~/$remote_dir.new \
&& rm -rf ~/$remote_dir && mv ~/$remote_dir.new ~/$remote_dir && cd ~/$remote_dir \
&& pip install -q -r requirements.txt 'jax[tpu]==0.10.2'"
}

finished() {  # the optional done marker exists
  [[ -n $done_marker ]] || return 1
  if [[ $dry_run == 1 ]]; then run gcloud storage ls "$done_marker"; return 1; fi
  gcloud storage ls "$done_marker" >/dev/null 2>&1
}

launch() {
  run gcloud compute tpus tpu-vm ssh "$tpu" "${gcloud_flags[@]}" --worker=all --command \
    "cd ~/$remote_dir && python3 -m mim_jax.main$main_args"
}

if [[ $check == 1 ]]; then  # the run's own step, compiled for the slice before anything is created
  aot_args=()
  skip_next=0
  for arg in "$@"; do
    if [[ $skip_next == 1 ]]; then skip_next=0; continue; fi
    case $arg in
      --workdir=*) ;;
      --workdir) skip_next=1 ;;
      *) aot_args+=("$arg") ;;
    esac
  done
  if [[ $dry_run == 1 ]]; then
    run python3 -m mim_jax.aot "--topology=$accelerator_type" "${aot_args[@]}"
  elif ! (cd "$repo" && python3 -m mim_jax.aot "--topology=$accelerator_type" "${aot_args[@]}"); then
    echo "--check: the run does not compile or fit on $accelerator_type (see above); nothing was created." >&2
    exit 1
  fi
fi

for ((attempt = 1; attempt <= max_attempts; attempt++)); do
  if finished; then echo "Done marker $done_marker exists: finished."; exit 0; fi
  if [[ $queued == 1 ]]; then
    query_state
    [[ $state == READY ]] || create_tpu
  fi
  copy_code
  status=0
  launch || status=$?
  if [[ $status == 0 ]]; then echo "Run finished (attempt $attempt)."; exit 0; fi
  query_state
  if [[ $queued == 1 && $state != READY ]]; then
    echo "Attempt $attempt: exit $status, TPU $tpu is $state (preempted?): recreating and resuming." >&2
    sleep "$retry_sleep"
    continue
  fi
  echo "Attempt $attempt failed with exit $status (TPU $state); not retrying." >&2
  exit "$status"
done
echo "Gave up after $max_attempts attempts." >&2
exit 1
