#!/usr/bin/env bash
# Run rdpo_jax on a Cloud TPU VM slice (one or many hosts).
#
#   launch/tpu_vm.sh STAGE [options] [-- TRAIN_ARGS...]
#
# STAGE:
#   create   create the TPU VM (or, with --queued, a queued resource and wait until it is ACTIVE)
#   setup    copy this checkout to every worker and install it with the `tpu` extra in ~/rdpo_venv
#   mount    install gcsfuse and mount --bucket at /gcs/BUCKET on every worker (the same path everywhere)
#   train    run `python -m rdpo_jax.train TRAIN_ARGS --config.distributed.auto=True` on all workers at once
#   delete   delete the TPU VM (or queued resource)
#   all      create, setup, mount (with --bucket), train
#
# Options (each also read from the environment variable in brackets):
#   --name=NAME          [TPU_NAME]      TPU VM / queued resource name (required)
#   --zone=ZONE          [TPU_ZONE]      e.g. us-east5-a (required)
#   --type=TYPE          [TPU_TYPE]      accelerator type, e.g. v5p-64, v5litepod-16 (create; default v5p-8)
#   --runtime=VERSION    [TPU_RUNTIME]   runtime version (create; default v2-alpha-tpuv5)
#   --project=PROJECT    [GCP_PROJECT]   Google Cloud project (default: gcloud's configured one)
#   --bucket=BUCKET      [GCS_BUCKET]    Cloud Storage bucket for data, models and workdirs (mount)
#   --spot                               Spot capacity (cheaper, preemptible at any time)
#   --queued                             create through a queued resource (waits for capacity)
#   --detach                             train: run under nohup on each worker (log: ~/rdpo_train.log)
#   --dry-run                            print every command instead of running it
#
# Preemption: a Spot or preempted TPU VM receives SIGTERM before it stops; the trainer saves a checkpoint
# of the current step and exits. Re-run `create`, `setup` and the same `train` command to resume.
# Storage: the trainer writes its workdir (checkpoints, metrics, TensorBoard) and reads models and data
# through file paths. Keep them in a bucket mounted by `mount` (e.g. --workdir=/gcs/BUCKET/runs/NAME):
# every worker sees the same files, each writes its own checkpoint shards, and a recreated VM finds the
# run where it stopped. gs:// URLs are refused by name.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

STAGE=${1:-}
[[ -n "$STAGE" ]] || die "usage: $0 create|setup|mount|train|delete|all [options] [-- TRAIN_ARGS...]"
shift
NAME=${TPU_NAME:-}; ZONE=${TPU_ZONE:-}; TYPE=${TPU_TYPE:-v5p-8}; RUNTIME=${TPU_RUNTIME:-v2-alpha-tpuv5}
PROJECT=${GCP_PROJECT:-}; BUCKET=${GCS_BUCKET:-}; SPOT=0; QUEUED=0; DETACH=0; TRAIN_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name=*) NAME=${1#*=} ;;
    --zone=*) ZONE=${1#*=} ;;
    --type=*) TYPE=${1#*=} ;;
    --runtime=*) RUNTIME=${1#*=} ;;
    --project=*) PROJECT=${1#*=} ;;
    --bucket=*) BUCKET=${1#*=} ;;
    --spot) SPOT=1 ;;
    --queued) QUEUED=1 ;;
    --detach) DETACH=1 ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) die "unknown option $1 (see the comments at the top of $0)" ;;
  esac
  shift
done
[[ -n "$NAME" ]] || die "--name (or TPU_NAME) is required"
[[ -n "$ZONE" ]] || die "--zone (or TPU_ZONE) is required"
GLOBAL=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && GLOBAL+=(--project="$PROJECT")
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

create() {
  if [[ "$QUEUED" == 1 ]]; then
    local extra=(); [[ "$SPOT" == 1 ]] && extra+=(--spot)
    run gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME" "${GLOBAL[@]}" \
      --accelerator-type="$TYPE" --runtime-version="$RUNTIME" "${extra[@]}"
    if [[ "$DRY_RUN" == 1 ]]; then
      show gcloud compute tpus queued-resources describe "$NAME" "${GLOBAL[@]}" '--format=value(state.state)'
      echo "# (repeated every 30 s until it prints ACTIVE)"
    else
      until [[ "$(gcloud compute tpus queued-resources describe "$NAME" "${GLOBAL[@]}" \
                 '--format=value(state.state)')" == ACTIVE ]]; do sleep 30; done
    fi
  else
    local extra=(); [[ "$SPOT" == 1 ]] && extra+=(--spot)
    run gcloud compute tpus tpu-vm create "$NAME" "${GLOBAL[@]}" --accelerator-type="$TYPE" \
      --version="$RUNTIME" "${extra[@]}"
  fi
}

setup() {
  # The checkout as it is (tracked and untracked files, not the ignored ones), the same on every worker.
  local archive=/tmp/rdpo_jax-src.tar.gz
  run tar -czf "$archive" -C "$REPO" --exclude=.git --exclude=.venv --exclude=demo_workdir --exclude='*.egg-info' .
  run gcloud compute tpus tpu-vm scp "$archive" "$NAME":rdpo_jax-src.tar.gz "${GLOBAL[@]}" --worker=all
  run gcloud compute tpus tpu-vm ssh "$NAME" "${GLOBAL[@]}" --worker=all --command="rm -rf ~/rdpo_jax && \
mkdir -p ~/rdpo_jax && tar -xzf ~/rdpo_jax-src.tar.gz -C ~/rdpo_jax && python3 -m venv ~/rdpo_venv && \
~/rdpo_venv/bin/pip install -q -U pip && ~/rdpo_venv/bin/pip install -q -e \"\$HOME/rdpo_jax[tpu]\""
}

mount() {
  [[ -n "$BUCKET" ]] || die "mount: --bucket (or GCS_BUCKET) is required"
  run gcloud compute tpus tpu-vm ssh "$NAME" "${GLOBAL[@]}" --worker=all --command="set -e; \
if ! command -v gcsfuse >/dev/null; then \
curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null; \
echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" \
| sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null; sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; fi; \
sudo mkdir -p /gcs/$BUCKET && sudo chown \$USER /gcs/$BUCKET; \
mountpoint -q /gcs/$BUCKET || gcsfuse --implicit-dirs $BUCKET /gcs/$BUCKET"
}

train() {
  [[ ${#TRAIN_ARGS[@]} -gt 0 ]] || die "train: give the trainer's flags after --, e.g. -- --config=configs/llava15_7b_tpu.py --workdir=/gcs/BUCKET/run"
  local cmd="~/rdpo_venv/bin/python -m rdpo_jax.train" a
  for a in "${TRAIN_ARGS[@]}"; do cmd+=" $(quote "$a")"; done
  cmd+=" --config.distributed.auto=True"
  if [[ "$DETACH" == 1 ]]; then cmd="nohup $cmd > ~/rdpo_train.log 2>&1 &"; fi
  cmd="cd ~/rdpo_jax && $cmd"
  run gcloud compute tpus tpu-vm ssh "$NAME" "${GLOBAL[@]}" --worker=all --command="$cmd"
}

delete() {
  if [[ "$QUEUED" == 1 ]]; then
    run gcloud compute tpus queued-resources delete "$NAME" "${GLOBAL[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$NAME" "${GLOBAL[@]}" --quiet
  fi
}

case "$STAGE" in
  create) create ;;
  setup) setup ;;
  mount) mount ;;
  train) train ;;
  delete) delete ;;
  all) create; setup; if [[ -n "$BUCKET" ]]; then mount; fi; train ;;
  *) die "unknown stage $STAGE: create|setup|mount|train|delete|all" ;;
esac
