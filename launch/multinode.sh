#!/usr/bin/env bash
# Train on several nodes: run this once per node (by hand, ssh, or launch/slurm.sbatch).
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: NNODES=N NODE_RANK=i MASTER_ADDR=host [MASTER_PORT=29500] [NGPU=8] [CONFIG=...] \
       [MAX_RESTARTS=0] [RDZV_ID=deepsuite] launch/multinode.sh [--dry-run] [key=value ...]

Starts a torchrun agent on this node that joins a c10d rendezvous at MASTER_ADDR:MASTER_PORT
with NNODES nodes of NGPU processes each, and runs `deepsuite train --config $CONFIG [args]`.
The node with NODE_RANK=0 hosts the rendezvous store (MASTER_ADDR must be that node).

Elastic restart: with MAX_RESTARTS=k, when any process dies (OOM, a killed rank, a lost node)
torchrun stops the others and restarts the whole job up to k times; training resumes from the
latest checkpoint in checkpoint.dir (checkpoint.resume=auto, the default).

Environment:
  NNODES        number of nodes (required)
  NODE_RANK     this node's index 0..NNODES-1 (required; 0 hosts the rendezvous)
  MASTER_ADDR   address of node 0 (required)
  MASTER_PORT   rendezvous port (default 29500)
  NGPU          processes per node (default: GPUs from nvidia-smi, else 1)
  CONFIG        run config YAML (default: configs/debug.yaml)
  MAX_RESTARTS  elastic restarts of the whole job (default 0)
  RDZV_ID       rendezvous/job id, the same on every node (default: SLURM_JOB_ID or "deepsuite")
  RDZV_TIMEOUT  seconds to wait for all nodes to join (default 900)
  PYTHON        interpreter (default: .venv/bin/python of the checkout if present, else python3)
  TORCHRUN_ARGS extra torchrun flags, word-split
  SHUTDOWN_TIMEOUT seconds the ranks get to checkpoint after SIGTERM/SIGUSR1 (default 300)
USAGE
}

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  usage
  exit 0
fi

: "${NNODES:?set NNODES (number of nodes); see launch/multinode.sh --help}"
: "${NODE_RANK:?set NODE_RANK (0..NNODES-1); see launch/multinode.sh --help}"
: "${MASTER_ADDR:?set MASTER_ADDR (address of node 0); see launch/multinode.sh --help}"
MASTER_PORT="${MASTER_PORT:-29500}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"
RDZV_ID="${RDZV_ID:-${SLURM_JOB_ID:-deepsuite}}"
RDZV_TIMEOUT="${RDZV_TIMEOUT:-900}"
CONFIG="${CONFIG:-configs/debug.yaml}"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON="python3"; fi
fi
if [[ -z "${NGPU:-}" ]]; then
  NGPU="$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)"
  [[ "$NGPU" =~ ^[1-9][0-9]*$ ]] || NGPU=1
fi
if ! [[ "$NODE_RANK" =~ ^[0-9]+$ ]] || ((NODE_RANK >= NNODES)); then
  echo "multinode.sh: NODE_RANK=$NODE_RANK must be in 0..$((NNODES - 1))" >&2
  exit 2
fi
is_host=false
if ((NODE_RANK == 0)); then is_host=true; fi
read -r -a extra <<<"${TORCHRUN_ARGS:-}"
# A fresh worker store for every restart attempt. By default torchrun shares the rendezvous store
# with the workers across attempts; the process-group keys of a killed attempt (same group names)
# then linger and a restarted rank can read a dead peer's address ("Connection refused").
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"

# Run from the caller's folder: relative paths (the config's data and run folders) resolve there,
# as with `deepsuite train`; a CONFIG given relative to the checkout is found there too.
if [[ ! -f "$CONFIG" && -f "$ROOT/$CONFIG" ]]; then CONFIG="$ROOT/$CONFIG"; fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# Forward SIGUSR1 too (SLURM's early warning: deepsuite checkpoints and stops on it and on SIGTERM)
# and give the ranks SHUTDOWN_TIMEOUT seconds to save before torchrun kills them (its default: 30).
if "$PYTHON" -m torch.distributed.run --help 2>/dev/null | grep -q -- "--signals-to-handle"; then
  extra+=(--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout "${SHUTDOWN_TIMEOUT:-300}")
fi
set -x
exec "$PYTHON" -m torch.distributed.run \
  --nnodes "$NNODES" --nproc-per-node "$NGPU" \
  --rdzv-backend c10d --rdzv-endpoint "${MASTER_ADDR}:${MASTER_PORT}" --rdzv-id "$RDZV_ID" \
  --rdzv-conf "is_host=${is_host},join_timeout=${RDZV_TIMEOUT}" \
  --max-restarts "$MAX_RESTARTS" "${extra[@]}" \
  -m deepsuite train --config "$CONFIG" "$@"
