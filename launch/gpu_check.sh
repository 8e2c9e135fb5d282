#!/usr/bin/env bash
# The whole GPU check in one command (docs/benchmarks.md, "GPU check"):
#
#   bash launch/gpu_check.sh                  # on the lent GPU machine: about 8 minutes
#   bash launch/gpu_check.sh --only bench_kernels bench_flce --budget 200    # a rerun of some steps
#   bash launch/gpu_check.sh --dry-run        # here, on CPU: the same steps at tiny shapes (make gpu-check-dry)
#
# Results go to $OUT (default gpu_check_out/): gpu_check.json, gpu_check.log, gpu_check.md and the PNGs. The last
# line printed is one JSON object. The GPU machine has its own python3 and no network: the packages it lacks come
# from the git-ignored .whl/ (make gpu-wheels), installed by the first step with pip --target.
set -uo pipefail
# The budget counts from here (launch/gpu_check.py, seconds_since_start), python start-ups included.
export FUXI_GPU_CHECK_T0="${FUXI_GPU_CHECK_T0:-$(date +%s.%N)}"
cd "$(dirname "$0")/.."

dry_run=0
for arg in "$@"; do
    [ "$arg" = "--dry-run" ] && dry_run=1
done
if [ -z "${PYTHON:-}" ]; then
    if [ "$dry_run" = 1 ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "gpu_check: no python interpreter '$PYTHON' (set PYTHON=...)" >&2
    echo '{"gpu_check": "failed", "error": "no python interpreter"}'
    exit 2
fi
version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "gpu_check: $PYTHON is Python $version; the project needs >= 3.11" >&2
    echo "{\"gpu_check\": \"failed\", \"error\": \"python $version < 3.11\"}"
    exit 2
fi
if [ "$dry_run" = 0 ] && [ "$version" != "3.12" ] && ls .whl/*cp312*.whl >/dev/null 2>&1; then
    echo "gpu_check: WARNING: $PYTHON is Python $version but .whl/ holds cp312 wheels;" \
         "rebuild them with: make gpu-wheels GPU_PYTHON_VERSION=$version" >&2
fi
# The GPU machine has the checkout but no install of it: expose the checkout's packages (every top folder with an
# __init__.py) as the `fuxi` namespace through a folder of links, as an install would. PYTHONSAFEPATH keeps the
# checkout's root off sys.path, where its `kernels/` would shadow Hugging Face's package of that name.
if ! "$PYTHON" -c 'import fuxi.launch.gpu_check' >/dev/null 2>&1; then
    namespace="$PWD/.namespace"  # git-ignored; remade each time
    rm -rf "$namespace" && mkdir -p "$namespace/fuxi"
    for init in */__init__.py; do ln -s "$PWD/${init%/__init__.py}" "$namespace/fuxi/${init%/__init__.py}"; done
    export PYTHONPATH="$namespace${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1
exec "$PYTHON" -m fuxi.launch.gpu_check "$@"
