#!/usr/bin/env bash
# Train on one node: one process per GPU through torchrun.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: [NGPU=8] [CONFIG=configs/x.yaml] launch/torchrun.sh [--dry-run] [key=value ...]

Runs `deepsuite train --config $CONFIG [args]` on one node with one process per GPU
(torchrun --standalone). Every argument after the script name goes to `deepsuite train`:
config overrides such as training.steps=100 parallel.zero_stage=2, or --dry-run to validate
the config and the parallel layout (on every rank) without training.

Environment:
  NGPU         processes on this node (default: number of GPUs from nvidia-smi, else 1)
  CONFIG       run config YAML (default: configs/debug.yaml)
  PYTHON       interpreter (default: .venv/bin/python of the checkout if present, else python3)
  MASTER_PORT  rendezvous port of the standalone run (default: a free port picked by torchrun)
  TORCHRUN_ARGS extra torchrun flags, word-split (e.g. "--log-dir runs/logs")
  SHUTDOWN_TIMEOUT seconds the ranks get to checkpoint after SIGTERM/SIGUSR1 (default 300)
USAGE
}

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  usage
  exit 0
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON="python3"; fi
fi
if [[ -z "${NGPU:-}" ]]; then
  NGPU="$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)"
  [[ "$NGPU" =~ ^[1-9][0-9]*$ ]] || NGPU=1
fi
CONFIG="${CONFIG:-configs/debug.yaml}"

rdzv=(--standalone)
if [[ -n "${MASTER_PORT:-}" ]]; then
  rdzv=(--rdzv-backend c10d --rdzv-endpoint "localhost:${MASTER_PORT}" --nnodes 1)
fi
read -r -a extra <<<"${TORCHRUN_ARGS:-}"

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
exec "$PYTHON" -m torch.distributed.run "${rdzv[@]}" --nproc-per-node "$NGPU" "${extra[@]}" \
  -m deepsuite train --config "$CONFIG" "$@"
