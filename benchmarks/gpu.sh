#!/usr/bin/env bash
# One-call GPU check on a fresh CUDA machine (see benchmarks/gpu.py): installs the project if needed, then runs
# every part and writes gpu_results.md / .json to $OUT (or ./gpu_results). Extra arguments go to benchmarks.gpu.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import contentv_torch, diffusers, torch" 2>/dev/null; then
  python3 -m pip install -q torch==2.13.0 -e ".[dev]"
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
exec python3 -m benchmarks.gpu --out "${OUT:-gpu_results}" "$@"
