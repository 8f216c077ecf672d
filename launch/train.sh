#!/usr/bin/env bash
# Single-node training: N local processes with torchrun (c10d rendezvous on localhost) or the
# deepspeed launcher; one plain process when N=1. gloo on CPU, NCCL on GPU (the engine picks it from
# the device; this script only reports it).
#
#   launch/train.sh CONFIG [--nproc N] [--launcher torchrun|deepspeed] [--master-port P]
#                   [--max-restarts R] [-- TRAIN_ARGS...]
#
#   CONFIG          run YAML (configs/*.yaml)
#   --nproc N       processes on this node (default: number of GPUs, or 1 on CPU)
#   --launcher L    torchrun (default) or deepspeed
#   --master-port P rendezvous port (default: a free port, torchrun --standalone)
#   --max-restarts R  torchrun restarts all workers up to R times after one fails (default 0); they
#                   resume from the last checkpoint
#   TRAIN_ARGS      passed to `llp-pretrain train` after --config, e.g. --set train.max_steps=100.
#                   `--resume auto` is added unless TRAIN_ARGS hold --resume or --overwrite, so a
#                   rerun (or a restarted worker) continues the run instead of replaying it.
#
# Environment: LLP_VENV, LLP_PYTHON, LLP_TRAIN_CMD, LLP_GPUS (see launch/lib.sh).
# Prints the world layout and refuses layouts the config cannot run, before starting training.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/lib.sh
. "$HERE/lib.sh"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }

CONFIG="" NPROC="" LAUNCHER=torchrun PORT="" RESTARTS=0
TRAIN_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --nproc|--nproc-per-node) NPROC=${2:?--nproc needs a number}; shift 2;;
    --nproc=*|--nproc-per-node=*) NPROC=${1#*=}; shift;;
    --launcher) LAUNCHER=${2:?--launcher needs torchrun or deepspeed}; shift 2;;
    --launcher=*) LAUNCHER=${1#*=}; shift;;
    --master-port) PORT=${2:?--master-port needs a port}; shift 2;;
    --master-port=*) PORT=${1#*=}; shift;;
    --max-restarts) RESTARTS=${2:?--max-restarts needs a number}; shift 2;;
    --max-restarts=*) RESTARTS=${1#*=}; shift;;
    -h|--help) usage; exit 0;;
    --) shift; TRAIN_ARGS=("$@"); break;;
    -*) llp_die "unknown option $1 (training arguments go after --; see --help)";;
    *) [ -z "$CONFIG" ] || llp_die "two configs given ('$CONFIG' and '$1'); training arguments go after --"
       CONFIG=$1; shift;;
  esac
done
[ -n "$CONFIG" ] || { usage >&2; llp_die "missing CONFIG"; }
case "$LAUNCHER" in torchrun|deepspeed) ;; *) llp_die "--launcher must be torchrun or deepspeed, got '$LAUNCHER'";; esac
[ -z "$PORT" ] || llp_is_uint "$PORT" || llp_die "--master-port must be a number, got '$PORT'"
llp_check_restarts "$RESTARTS"
llp_with_resume "${TRAIN_ARGS[@]}"

llp_setup_python
CONFIG=$("$PYTHON" -m llp_pretrain.launch_utils config-path "$CONFIG") || exit 2
llp_setup_train_cmd
GPUS=$(llp_gpu_count)
BACKEND=$(llp_backend_for "$GPUS")
if [ -z "$NPROC" ]; then NPROC=$(( GPUS > 0 ? GPUS : 1 )); fi
llp_is_uint "$NPROC" && [ "$NPROC" -ge 1 ] || llp_die "--nproc must be a positive integer, got '$NPROC'"
if [ "$GPUS" -gt 0 ] && [ "$NPROC" -gt "$GPUS" ]; then
  llp_die "--nproc $NPROC but this node has $GPUS GPU(s); use --nproc $GPUS or fewer"
fi

"$PYTHON" -m llp_pretrain.launch_utils layout ${LLP_SKIP_CONFIG_CHECK:+--no-config-check} --config "$CONFIG" --nnodes 1 --nproc-per-node "$NPROC" \
  --hosts "$(hostname)" --backend "$BACKEND" --launcher "train.sh/$([ "$NPROC" = 1 ] && echo single || echo "$LAUNCHER")" \
  -- "${TRAIN_ARGS[@]}" || exit 2

if [ "$NPROC" = 1 ]; then
  exec "${TRAIN_CMD[@]}" --config "$CONFIG" "${TRAIN_ARGS[@]}"
fi

if [ "$LAUNCHER" = deepspeed ]; then
  DS=$(dirname "$PYTHON")/deepspeed
  [ -x "$DS" ] || DS=$(command -v deepspeed) || llp_die "deepspeed launcher not found next to $PYTHON or on PATH"
  # --no_python: the training command is an executable; --no_local_rank: it reads LOCAL_RANK from env.
  [ -n "$PORT" ] || PORT=$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  exec "$DS" --num_nodes 1 --num_gpus "$NPROC" --master_port "$PORT" --no_python --no_local_rank \
    "${TRAIN_CMD[@]}" --config "$CONFIG" "${TRAIN_ARGS[@]}"
fi

if [ -n "$PORT" ]; then
  RDZV=(--rdzv-backend c10d --rdzv-endpoint "127.0.0.1:$PORT" --rdzv-id "llp-$$")
else
  RDZV=(--standalone)
fi
exec "$PYTHON" -m llp_pretrain.torchrun "${RDZV[@]}" --nnodes 1 --nproc-per-node "$NPROC" --max-restarts "$RESTARTS" --no-python \
  "${TRAIN_CMD[@]}" --config "$CONFIG" "${TRAIN_ARGS[@]}"
