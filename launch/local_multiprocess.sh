#!/usr/bin/env bash
# N JAX processes of `python -m rdpo_jax.train` on this machine, CPU backend, coordinated over
# 127.0.0.1 with gloo collectives: the multi-host code paths (per-process data shards, global arrays,
# collective checkpoints) without a cluster. Used by the tests.
#
#   launch/local_multiprocess.sh [options] -- TRAIN_ARGS...
#
# Options:
#   --processes=N            processes (default 2)
#   --devices_per_process=D  simulated CPU devices in each process (default 1)
#   --port=PORT              coordinator port on 127.0.0.1 (default: a free one)
#   --log_dir=DIR            process i>0 writes DIR/process-i.log (default: a temporary folder);
#                            process 0 writes to this terminal
#   --python=PATH            interpreter with rdpo_jax installed (default: $PYTHON or python3)
#   --dry-run                print the commands instead of running them
# The script exits with the first non-zero status of any process (stopping the others) and shows
# the tail of a failing process's log.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

N=2; DEVICES=1; PORT=""; LOG_DIR=""; PYTHON=${PYTHON:-python3}; TRAIN_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --processes=*) N=${1#*=} ;;
    --devices_per_process=*) DEVICES=${1#*=} ;;
    --port=*) PORT=${1#*=} ;;
    --log_dir=*) LOG_DIR=${1#*=} ;;
    --python=*) PYTHON=${1#*=} ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) die "unknown option $1 (see the comments at the top of $0)" ;;
  esac
  shift
done
[[ ${#TRAIN_ARGS[@]} -gt 0 ]] || die "give the trainer's flags after --, e.g. -- --config=configs/smoke.py:dir=DIR --workdir=DIR"
[[ "$N" =~ ^[1-9][0-9]*$ ]] || die "--processes=$N: expected a positive integer"
if [[ -z "$PORT" ]]; then
  PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
[[ -n "$LOG_DIR" || "$DRY_RUN" == 1 ]] || LOG_DIR=$(mktemp -d -t rdpo_local_mp.XXXXXX)

command_for() {  # command_for I: process I's command line
  COMMAND=(env JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count="$DEVICES"
           "$PYTHON" -m rdpo_jax.train "${TRAIN_ARGS[@]}"
           --config.distributed.coordinator=127.0.0.1:"$PORT" --config.distributed.num_processes="$N"
           --config.distributed.process_id="$1")
}

if [[ "$DRY_RUN" == 1 ]]; then
  for ((i = 0; i < N; i++)); do command_for "$i"; show "${COMMAND[@]}"; done
  exit 0
fi

mkdir -p "$LOG_DIR"
PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT
trap 'cleanup; exit 143' TERM INT
for ((i = 1; i < N; i++)); do
  command_for "$i"
  "${COMMAND[@]}" > "$LOG_DIR/process-$i.log" 2>&1 &
  PIDS+=($!)
done
command_for 0
"${COMMAND[@]}" &
PIDS=($! "${PIDS[@]}")

# Wait for all; the first failure stops the rest.
status=0
LIVE=("${PIDS[@]}")
while (( ${#LIVE[@]} > 0 )); do
  set +e; wait -n -p done_pid "${LIVE[@]}"; rc=$?; set -e
  for ((i = 0; i < ${#LIVE[@]}; i++)); do [[ "${LIVE[$i]}" == "$done_pid" ]] && unset 'LIVE[i]'; done
  LIVE=("${LIVE[@]}")
  if (( rc != 0 )); then
    status=$rc
    for ((i = 0; i < N; i++)); do
      if [[ "${PIDS[$i]}" == "$done_pid" && $i -gt 0 ]]; then
        echo "process $i failed (exit $rc); its log ($LOG_DIR/process-$i.log) ends:" >&2
        tail -n 40 "$LOG_DIR/process-$i.log" >&2
      fi
    done
    break
  fi
done
if (( status == 0 )); then echo "all $N processes finished (logs of processes 1..$((N - 1)): $LOG_DIR)"; fi
exit $status
