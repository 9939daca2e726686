#!/usr/bin/env bash
# On the GPU host, from anywhere: install the wheels carried in .whl/ (see scripts/gpu_wheels.sh)
# into /tmp/site without touching the image's packages, then run the check into DIR.
#   bash scripts/gpu_check.sh DIR [gpu_check.py options...]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: bash scripts/gpu_check.sh OUTPUT_DIR [options]}"
shift
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec python3 scripts/gpu_check.py --output "$out" "$@"
