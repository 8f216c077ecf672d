#!/usr/bin/env bash
# Multi-node training without a scheduler (torchrun, static rendezvous: node rank R runs global
# ranks R*K .. R*K+K-1, so rank 0 is always on node rank 0 = the master address).
#
# Either start it on every node yourself:
#   launch/multinode.sh CONFIG --nnodes N --node-rank R --master-addr HOST [--master-port P]
#                       [--nproc-per-node K] [-- TRAIN_ARGS...]
# or give a DeepSpeed-style hostfile ("host slots=K" lines) and it starts itself on every host over
# ssh (hosts that are this machine run locally; the first host is the master):
#   launch/multinode.sh CONFIG --hostfile FILE [--master-port P] [-- TRAIN_ARGS...]
#
#   --master-port P     rendezvous TCP port on the master, same on every node (default 29500)
#   --nproc-per-node K  processes on this node (default: number of GPUs, or 1 on CPU)
#   TRAIN_ARGS          passed to `llp-pretrain train` after --config; `--resume auto` is added
#                       unless they hold --resume or --overwrite (a relaunch continues the run)
#
# Environment: LLP_VENV, LLP_PYTHON, LLP_TRAIN_CMD, LLP_GPUS (launch/lib.sh); LLP_SSH (default
# "ssh -o BatchMode=yes"); variables named LLP_*, NCCL_*, GLOO_*, TORCH_*, OMP_NUM_THREADS and
# PYTHONPATH are forwarded to remote hosts. LLP_SKIP_HOST_CHECK=1 skips the check that node rank 0
# runs on the master address. See docs/launching.md for the NCCL/network variables.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/lib.sh
. "$HERE/lib.sh"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }

CONFIG="" HOSTFILE="" NNODES="" NODE_RANK="" MASTER_ADDR_ARG="" PORT=29500 NPROC=""
TRAIN_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --hostfile) HOSTFILE=${2:?--hostfile needs a file}; shift 2;;
    --nnodes) NNODES=${2:?--nnodes needs a number}; shift 2;;
    --node-rank|--node_rank) NODE_RANK=${2:?--node-rank needs a number}; shift 2;;
    --master-addr|--master_addr) MASTER_ADDR_ARG=${2:?--master-addr needs a host}; shift 2;;
    --master-port|--master_port) PORT=${2:?--master-port needs a port}; shift 2;;
    --nproc-per-node|--nproc_per_node|--nproc) NPROC=${2:?--nproc-per-node needs a number}; shift 2;;
    --*=*) opt=${1%%=*}; val=${1#*=}; shift; set -- "$opt" "$val" "$@";;
    -h|--help) usage; exit 0;;
    --) shift; TRAIN_ARGS=("$@"); break;;
    -*) llp_die "unknown option $1 (training arguments go after --; see --help)";;
    *) [ -z "$CONFIG" ] || llp_die "two configs given ('$CONFIG' and '$1'); training arguments go after --"
       CONFIG=$1; shift;;
  esac
done
[ -n "$CONFIG" ] || { usage >&2; llp_die "missing CONFIG"; }
llp_is_uint "$PORT" && [ "$PORT" -ge 1 ] && [ "$PORT" -le 65535 ] || llp_die "--master-port must be 1-65535, got '$PORT'"
llp_setup_python
CONFIG=$("$PYTHON" -m llp_pretrain.launch_utils config-path "$CONFIG") || exit 2
CONFIG_ABS=$CONFIG
llp_with_resume "${TRAIN_ARGS[@]}"

# ---------------------------------------------------------------- hostfile: fan out to every host
if [ -n "$HOSTFILE" ]; then
  [ -z "$NNODES$NODE_RANK$MASTER_ADDR_ARG" ] || llp_die "--hostfile replaces --nnodes/--node-rank/--master-addr; give one or the other"
  HOSTS=() SLOTS=()
  while read -r h s; do HOSTS+=("$h"); SLOTS+=("$s"); done \
    < <("$PYTHON" -m llp_pretrain.launch_utils hostfile "$HOSTFILE" || echo "__error__ 0")
  [ "${HOSTS[-1]}" != __error__ ] || exit 2
  N=${#HOSTS[@]}
  for s in "${SLOTS[@]}"; do
    [ "$s" = "${SLOTS[0]}" ] || llp_die "$HOSTFILE: every host needs the same slots= (found ${SLOTS[*]}); data-parallel ranks must be spread evenly"
  done
  [ -z "$NPROC" ] || [ "$NPROC" = "${SLOTS[0]}" ] || llp_die "--nproc-per-node $NPROC disagrees with slots=${SLOTS[0]} in $HOSTFILE"
  MASTER=${HOSTS[0]} ALL_LOCAL=1
  for h in "${HOSTS[@]}"; do llp_is_local_host "$h" || ALL_LOCAL=0; done
  if llp_is_local_host "$MASTER"; then
    if [ "$ALL_LOCAL" = 1 ]; then MASTER=127.0.0.1
    else case "$MASTER" in localhost|localhost.*|127.*|::1)
      llp_die "$HOSTFILE: the first host '$MASTER' is the master, but remote hosts cannot reach it by that name; list this machine by its network name";; esac
    fi
  fi
  "$PYTHON" -m llp_pretrain.launch_utils layout ${LLP_SKIP_CONFIG_CHECK:+--no-config-check} --config "$CONFIG" --nnodes "$N" --nproc-per-node "${SLOTS[0]}" \
    --hosts "$(IFS=,; echo "${HOSTS[*]}")" --master-addr "$MASTER" --master-port "$PORT" \
    --backend "$(llp_backend_for "$(llp_gpu_count)")" --launcher "multinode.sh/hostfile" -- "${TRAIN_ARGS[@]}" || exit 2

  SSH=${LLP_SSH:-ssh -o BatchMode=yes}
  read -r -a SSH_CMD <<< "$SSH"
  ENV_FWD=""
  while IFS='=' read -r k _; do
    case "$k" in LLP_*|NCCL_*|GLOO_*|TORCH_*|OMP_NUM_THREADS|PYTHONPATH) ENV_FWD+="export $k=$(printf %q "${!k}"); ";; esac
  done < <(env)
  for i in "${!HOSTS[@]}"; do
    h=${HOSTS[$i]}
    llp_is_local_host "$h" && continue
    "${SSH_CMD[@]}" -o ConnectTimeout=15 "$h" true </dev/null 2>/dev/null || llp_die \
      "cannot ssh to $h without a password ('${SSH_CMD[*]} $h true' failed). Set up key-based ssh between nodes, or run launch/multinode.sh on every node yourself with --nnodes $N --node-rank I --master-addr $MASTER (see docs/launching.md)"
  done

  PIDS=()
  cleanup() { for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; }
  trap 'llp_log "signal received: stopping all nodes"; cleanup' TERM INT
  for i in "${!HOSTS[@]}"; do
    h=${HOSTS[$i]}
    NODE_CMD=("$HERE/multinode.sh" "$CONFIG_ABS" --nnodes "$N" --node-rank "$i" --master-addr "$MASTER"
              --master-port "$PORT" --nproc-per-node "${SLOTS[$i]}" -- "${TRAIN_ARGS[@]}")
    if llp_is_local_host "$h"; then
      LLP_SKIP_HOST_CHECK=1 "${NODE_CMD[@]}" &
    else
      "${SSH_CMD[@]}" "$h" "cd $(printf %q "$PWD") && $ENV_FWD $(printf '%q ' "${NODE_CMD[@]}")" </dev/null &
    fi
    PIDS+=($!)
    llp_log "node $i ($h) started"
  done
  RC=0 RUNNING=("${PIDS[@]}")
  while [ "${#RUNNING[@]}" -gt 0 ]; do
    DONE="" rc=0
    wait -n -p DONE "${RUNNING[@]}" || rc=$?
    [ -n "$DONE" ] || continue            # interrupted by a trapped signal: keep waiting
    NEXT=(); for p in "${RUNNING[@]}"; do [ "$p" = "$DONE" ] || NEXT+=("$p"); done; RUNNING=("${NEXT[@]}")
    for i in "${!PIDS[@]}"; do [ "${PIDS[$i]}" = "$DONE" ] && NODE=$i; done
    if [ "$rc" != 0 ] && [ "$RC" = 0 ]; then
      RC=$rc; llp_log "node $NODE (${HOSTS[$NODE]}) failed with exit code $rc; stopping the others"; cleanup
    fi
  done
  exit "$RC"
fi

# ---------------------------------------------------------------- this node only
[ -n "$NNODES" ] && [ -n "$NODE_RANK" ] && [ -n "$MASTER_ADDR_ARG" ] \
  || llp_die "give --hostfile FILE, or all of --nnodes, --node-rank and --master-addr (see --help)"
llp_is_uint "$NNODES" && [ "$NNODES" -ge 1 ] || llp_die "--nnodes must be a positive integer, got '$NNODES'"
llp_is_uint "$NODE_RANK" && [ "$NODE_RANK" -lt "$NNODES" ] || llp_die "--node-rank must be 0..$((NNODES - 1)), got '$NODE_RANK'"
if [ "$NODE_RANK" = 0 ] && [ "${LLP_SKIP_HOST_CHECK:-0}" != 1 ] && ! llp_is_local_host "$MASTER_ADDR_ARG"; then
  llp_die "node rank 0 hosts the rendezvous and global rank 0, but --master-addr $MASTER_ADDR_ARG is not this machine ($(hostname)); start node rank 0 on $MASTER_ADDR_ARG (or set LLP_SKIP_HOST_CHECK=1 if it is an alias of this host)"
fi
llp_setup_train_cmd
GPUS=$(llp_gpu_count)
if [ -z "$NPROC" ]; then NPROC=$(( GPUS > 0 ? GPUS : 1 )); fi
llp_is_uint "$NPROC" && [ "$NPROC" -ge 1 ] || llp_die "--nproc-per-node must be a positive integer, got '$NPROC'"

"$PYTHON" -m llp_pretrain.launch_utils layout ${LLP_SKIP_CONFIG_CHECK:+--no-config-check} --config "$CONFIG" --nnodes "$NNODES" --nproc-per-node "$NPROC" \
  --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR_ARG" --master-port "$PORT" \
  --backend "$(llp_backend_for "$GPUS")" --launcher "multinode.sh node $NODE_RANK on $(hostname)" \
  -- "${TRAIN_ARGS[@]}" || exit 2

exec "$PYTHON" -m llp_pretrain.torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC" \
  --master-addr "$MASTER_ADDR_ARG" --master-port "$PORT" --no-python \
  "${TRAIN_CMD[@]}" --config "$CONFIG_ABS" "${TRAIN_ARGS[@]}"
