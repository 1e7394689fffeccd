#!/usr/bin/env bash
# The GPU check on a CUDA machine that has torch but no internet (e.g. the tool library's `device` entry):
# installs the carried wheels (.whl/, see benchmarks/README.md) into /tmp/site, puts this checkout on the path
# and runs benchmarks/gpu_check.py, which writes ${OUT:-.}/gpu_check.md. Extra arguments go to gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python3 benchmarks/gpu_check.py --output "${OUT:-.}/gpu_check.md" "$@"
