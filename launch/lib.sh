# shellcheck shell=bash
# Shared helpers for launch/train.sh, launch/multinode.sh and launch/slurm/*. Source it; do not run it.
#
# Environment a user may set (all optional):
#   LLP_VENV        virtualenv to activate before anything else (e.g. /shared/llp/.venv)
#   LLP_PYTHON      Python interpreter to use (default: python3 on PATH after LLP_VENV)
#   LLP_TRAIN_CMD   the training command, split on spaces (default: "llp-pretrain train");
#                   it receives --config CONFIG and the training arguments
#   LLP_GPUS        GPUs per node to assume (default: torch.cuda.device_count())

llp_log() { echo "[llp-launch] $*" >&2; }
llp_die() { echo "[llp-launch] error: $*" >&2; exit 2; }

# Sets PYTHON (absolute) after activating LLP_VENV if given.
llp_setup_python() {
  if [ -n "${LLP_VENV:-}" ]; then
    [ -f "$LLP_VENV/bin/activate" ] || llp_die "LLP_VENV=$LLP_VENV has no bin/activate; point it at a virtualenv"
    # shellcheck disable=SC1091
    . "$LLP_VENV/bin/activate"
  fi
  PYTHON=${LLP_PYTHON:-python3}
  PYTHON=$(command -v "$PYTHON") || llp_die "Python '${LLP_PYTHON:-python3}' not found; set LLP_VENV or LLP_PYTHON"
  "$PYTHON" -c 'import llp_pretrain.launch_utils' 2>/dev/null \
    || llp_die "$PYTHON cannot import llp_pretrain; install the repo (pip install -e .) or set LLP_VENV / LLP_PYTHON"
  export PYTHON
}

# Sets the array TRAIN_CMD from LLP_TRAIN_CMD; the first word is made absolute.
llp_setup_train_cmd() {
  read -r -a TRAIN_CMD <<< "${LLP_TRAIN_CMD:-llp-pretrain train}"
  [ "${#TRAIN_CMD[@]}" -gt 0 ] || llp_die "LLP_TRAIN_CMD is empty"
  local exe="${TRAIN_CMD[0]}" found=""
  if [ "$exe" = python ] || [ "$exe" = python3 ]; then
    found=$PYTHON
  elif [ -x "$(dirname "$PYTHON")/$exe" ]; then
    found="$(dirname "$PYTHON")/$exe"
  else
    found=$(command -v "$exe") || llp_die "training command '$exe' not found on PATH; install the repo (pip install -e .) or set LLP_TRAIN_CMD"
  fi
  TRAIN_CMD[0]=$found
}

# Prints the number of GPUs this node offers (LLP_GPUS overrides): the entries of
# CUDA_VISIBLE_DEVICES when set, else the GPUs nvidia-smi lists, else 0. No torch import (fast).
llp_gpu_count() {
  if [ -n "${LLP_GPUS:-}" ]; then echo "$LLP_GPUS"; return; fi
  if [ -n "${CUDA_VISIBLE_DEVICES+x}" ]; then
    local v=${CUDA_VISIBLE_DEVICES// /}
    case "$v" in ''|-1|none|NoDevFiles) echo 0;; *) awk -F, '{print NF}' <<< "$v";; esac
    return
  fi
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    return
  fi
  echo 0
}

# The process-group backend the engine will pick: nccl with GPUs, gloo on CPU.
llp_backend_for() { if [ "${1:-0}" -gt 0 ]; then echo nccl; else echo gloo; fi; }

llp_is_uint() { case "$1" in ''|*[!0-9]*) return 1;; *) return 0;; esac; }

# True when the host name refers to this machine (loopback or one of its names/addresses).
llp_is_local_host() {
  local h=$1
  case "$h" in localhost|localhost.*|127.*|::1) return 0;; esac
  [ "$h" = "$(hostname)" ] || [ "$h" = "$(hostname -s 2>/dev/null)" ] || [ "$h" = "$(hostname -f 2>/dev/null)" ] && return 0
  local a
  for a in $(hostname -I 2>/dev/null); do [ "$h" = "$a" ] && return 0; done
  return 1
}

# Sets the array TRAIN_ARGS to its arguments plus `--resume auto` unless they already choose
# (--resume X, --resume=X or --overwrite): a launcher restarting a job, or torchrun restarting a
# worker (--max-restarts), must continue the run directory's last checkpoint, never replay it from
# step 0 (with no checkpoint yet, `--resume auto` starts fresh).
llp_with_resume() {
  TRAIN_ARGS=("$@")
  local a
  for a in "$@"; do
    case "$a" in --resume|--resume=*|--overwrite) return 0;; esac
  done
  TRAIN_ARGS+=(--resume auto)
}

# Checks a torchrun --max-restarts value.
llp_check_restarts() { llp_is_uint "$1" || llp_die "--max-restarts must be a non-negative integer, got '$1'"; }

# The default torchrun: the module of the chosen Python, so it matches the training interpreter.
llp_torchrun() { "$PYTHON" -m llp_pretrain.torchrun "$@"; }
