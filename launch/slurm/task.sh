#!/usr/bin/env bash
# One SLURM task, started by `srun` from launch/slurm/llp_pretrain.sbatch. Everything that differs
# between tasks (SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID, the host) is read here, inside the
# task, never in the batch script.
#
#   task.sh CONFIG [TRAIN_ARGS...]
#
# Needs from the batch script: MASTER_ADDR, MASTER_PORT, LLP_SLURM_MODE (torchrun|srun),
# LLP_NPROC_PER_NODE. torchrun mode: this task is the node's launcher (node rank = SLURM_NODEID).
# srun mode: this task is one training process (RANK = SLURM_PROCID, LOCAL_RANK = SLURM_LOCALID).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/lib.sh
. "$HERE/../lib.sh"
CONFIG=${1:?usage: task.sh CONFIG [TRAIN_ARGS...]}; shift
: "${MASTER_ADDR:?set by llp_pretrain.sbatch}" "${MASTER_PORT:?set by llp_pretrain.sbatch}"
: "${LLP_SLURM_MODE:?set by llp_pretrain.sbatch}" "${LLP_NPROC_PER_NODE:?set by llp_pretrain.sbatch}"
llp_setup_python
llp_setup_train_cmd

NODE_RANK=${SLURM_NODEID:?not inside an srun task}
# Rank 0 must run where the rendezvous is: the first host of the nodelist.
if [ "${SLURM_PROCID:-0}" = 0 ] && ! llp_is_local_host "$MASTER_ADDR"; then
  llp_die "task 0 runs on $(hostname) but MASTER_ADDR=$MASTER_ADDR (first host of $SLURM_JOB_NODELIST); do not reorder tasks with --distribution/--relative, or set MASTER_ADDR consistently (docs/launching.md: rank 0 on an unexpected host)"
fi

case "$LLP_SLURM_MODE" in
  torchrun)
    # Preemption: SLURM signals every process of the step (`scancel --signal`, or the batch script
    # forwarding --signal=B:TERM). The training processes catch TERM/USR1, checkpoint and exit 0.
    # torchrun must neither die on them (USR1's default) nor turn them into a failure (its TERM
    # handler kills the workers and exits 1), so it ignores both: an ignored signal stays ignored
    # across exec, and PET_SIGNALS_TO_HANDLE (torchrun --signals-to-handle) keeps torchrun from
    # installing a TERM handler. The workers install their own handlers; torchrun still reports
    # their exit status.
    trap '' TERM USR1
    export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGINT,SIGHUP,SIGQUIT}
    llp_log "node $NODE_RANK ($(hostname)): torchrun with $LLP_NPROC_PER_NODE process(es), global ranks $(( NODE_RANK * LLP_NPROC_PER_NODE ))-$(( (NODE_RANK + 1) * LLP_NPROC_PER_NODE - 1 ))"
    exec "$PYTHON" -m llp_pretrain.torchrun --nnodes "${SLURM_NNODES:?}" --node-rank "$NODE_RANK" \
      --nproc-per-node "$LLP_NPROC_PER_NODE" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
      --max-restarts "${LLP_MAX_RESTARTS:-0}" \
      --no-python "${TRAIN_CMD[@]}" --config "$CONFIG" "$@"
    ;;
  srun)
    export RANK=${SLURM_PROCID:?} WORLD_SIZE=${SLURM_NTASKS:?} LOCAL_RANK=${SLURM_LOCALID:?}
    export LOCAL_WORLD_SIZE=$LLP_NPROC_PER_NODE GROUP_RANK=$NODE_RANK
    llp_log "rank $RANK/$WORLD_SIZE (local $LOCAL_RANK) on node $NODE_RANK ($(hostname))"
    exec "${TRAIN_CMD[@]}" --config "$CONFIG" "$@"
    ;;
  *) llp_die "LLP_SLURM_MODE must be torchrun or srun, got '$LLP_SLURM_MODE'";;
esac
