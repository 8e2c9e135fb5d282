#!/usr/bin/env bash
# One node, N processes (one per GPU; on CPU, gloo processes).
#   NPROC=8 launch/train_single_node.sh configs/train/fuxitranyu-8b.yaml [--set key=value ...]
# Variables: NPROC (default: number of GPUs, else 1), PYTHON (default: .venv/bin/python if present),
# SHUTDOWN_TIMEOUT (seconds the ranks get to checkpoint after SIGTERM/SIGINT, default 300), MAX_RESTARTS (times
# torchrun restarts all ranks after one fails, default 0; each restart resumes from `latest`).
# launch.torchrun is torchrun acting on the first SIGTERM/SIGINT only (see its docstring).
set -euo pipefail
CONFIG=${1:?usage: $0 <run.yaml> [--set key=value ...]}; shift
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONSAFEPATH=1  # the checkout's root off sys.path: its kernels/ would shadow Hugging Face's
NPROC=${NPROC:-$($PYTHON -c "import torch; print(max(torch.cuda.device_count(), 1))")}
exec "$PYTHON" -m fuxi.launch.torchrun --standalone --nproc_per_node "$NPROC" --max_restarts "${MAX_RESTARTS:-0}" \
    -m fuxi.launch.cli pretrain --config "$CONFIG" "$@"
