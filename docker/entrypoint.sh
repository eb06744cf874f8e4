#!/usr/bin/env bash
# Container entry point: `docker run deepsuite train --config …` runs `deepsuite train --config …`;
# a first argument that is an executable (torchrun, bash, python, launch/*.sh) runs as is.
set -euo pipefail

# Under SLURM without an explicit rank layout, derive torchrun's node rank from SLURM's.
if [[ -n "${SLURM_NODEID:-}" && -z "${NODE_RANK:-}" ]]; then
  export NODE_RANK="${SLURM_NODEID}"
fi

if [[ $# -gt 0 ]] && command -v "$1" >/dev/null 2>&1 && [[ "$1" != "train" && "$1" != "generate" && "$1" != "plan" && "$1" != "convert" ]]; then
  exec "$@"
fi
exec deepsuite "$@"
