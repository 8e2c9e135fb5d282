#!/usr/bin/env bash
# Several nodes with torchrun's c10d rendezvous. Run the same command on every node:
#   NNODES=4 NPROC=8 RDZV_HOST=node001 RDZV_PORT=29400 RUN_ID=fuxi8b \
#     launch/train_multi_node.sh configs/train/fuxitranyu-8b.yaml
# Variables: NNODES (nodes, or MIN:MAX for elastic), NPROC (processes per node), RDZV_HOST/RDZV_PORT (a host
# every node can reach), RUN_ID (the same on all nodes of one job), PYTHON, SHUTDOWN_TIMEOUT (seconds the ranks get
# to checkpoint after SIGTERM/SIGINT, default 300). launch.torchrun: torchrun acting on the first signal only.
set -euo pipefail
CONFIG=${1:?usage: $0 <run.yaml> [--set key=value ...]}; shift
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONSAFEPATH=1  # the checkout's root off sys.path: its kernels/ would shadow Hugging Face's
: "${NNODES:?set NNODES}" "${RDZV_HOST:?set RDZV_HOST}"
exec "$PYTHON" -m fuxi.launch.torchrun \
    --nnodes "$NNODES" --nproc_per_node "${NPROC:-8}" \
    --rdzv_backend c10d --rdzv_endpoint "${RDZV_HOST}:${RDZV_PORT:-29400}" --rdzv_id "${RUN_ID:-fuxi}" \
    --max_restarts "${MAX_RESTARTS:-0}" \
    -m fuxi.launch.cli pretrain --config "$CONFIG" "$@"
