#!/usr/bin/env bash
# Run rdpo_jax on one host with N GPUs, or on several such hosts.
#
#   launch/gpu.sh [options] -- TRAIN_ARGS...
#
# One host: one process drives all its GPUs (JAX's single-controller model); the mesh in the config
# (e.g. configs/llava15_7b_gpu.py: fsdp 8) spans them.
# Several hosts: run this script on every host with the same flags and its own --node_rank; process 0's
# host is the coordinator (jax.distributed). On SLURM, use --slurm instead (srun sets the ranks and
# jax.distributed.initialize() reads them).
#
# Options (each also read from the environment variable in brackets):
#   --gpus=N                 [NUM_GPUS]     GPUs to use on this host (default: all; sets CUDA_VISIBLE_DEVICES)
#   --nodes=N                [NNODES]       hosts in the job (default 1)
#   --node_rank=R            [NODE_RANK]    this host's rank, 0..N-1
#   --coordinator=HOST:PORT  [COORDINATOR, or MASTER_ADDR:MASTER_PORT]  rank 0's address
#   --slurm                                 multi-node through SLURM's environment
#   --python=PATH            [PYTHON]       interpreter with rdpo_jax installed (default: python3)
#   --dry-run                               print the command instead of running it
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

GPUS=${NUM_GPUS:-}; NODES=${NNODES:-1}; RANK=${NODE_RANK:-0}; SLURM=0
COORDINATOR=${COORDINATOR:-${MASTER_ADDR:+$MASTER_ADDR:${MASTER_PORT:-29500}}}
PYTHON=${PYTHON:-python3}; TRAIN_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --gpus=*) GPUS=${1#*=} ;;
    --nodes=*) NODES=${1#*=} ;;
    --node_rank=*) RANK=${1#*=} ;;
    --coordinator=*) COORDINATOR=${1#*=} ;;
    --slurm) SLURM=1 ;;
    --python=*) PYTHON=${1#*=} ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) die "unknown option $1 (see the comments at the top of $0)" ;;
  esac
  shift
done
[[ ${#TRAIN_ARGS[@]} -gt 0 ]] || die "give the trainer's flags after --, e.g. -- --config=configs/llava15_7b_gpu.py:data=DIR --workdir=DIR"

ENV=(XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
     "XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true${XLA_FLAGS:+ $XLA_FLAGS}")
if [[ -n "$GPUS" ]]; then
  ENV+=(CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((GPUS - 1))))
fi
DIST=()
if [[ "$SLURM" == 1 ]]; then
  DIST=(--config.distributed.auto=True)
elif [[ "$NODES" -gt 1 ]]; then
  [[ -n "$COORDINATOR" ]] || die "--nodes=$NODES needs --coordinator=HOST:PORT (rank 0's address)"
  (( RANK >= 0 && RANK < NODES )) || die "--node_rank=$RANK is not in 0..$((NODES - 1))"
  DIST=(--config.distributed.coordinator="$COORDINATOR" --config.distributed.num_processes="$NODES"
        --config.distributed.process_id="$RANK")
fi
run env "${ENV[@]}" "$PYTHON" -m rdpo_jax.train "${TRAIN_ARGS[@]}" "${DIST[@]}"
