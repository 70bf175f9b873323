#!/usr/bin/env bash
# One-call GPU check on a fresh CUDA machine (see benchmarks/gpu.py): installs the project if needed, then runs
# every part and writes gpu_results.md / .json to $OUT (or ./gpu_results). Extra arguments go to benchmarks.gpu.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import contentv_torch, diffusers, torch" 2>/dev/null; then
  python3 -m pip install -q torch==2.13.0 -e ".[dev]"
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
python3 -m benchmarks.gpu --out "${OUT:-gpu_results}" "$@"

# ---- issue 17: --compile and step caches on the GPU (first call incl. compile, steady state, speed-ups) ----
python3 -m benchmarks.compile_speed --preset small --device cuda --frames 33 --height 256 --width 448 --batch 1 \
  --steps 20 --repeats 3 --caches none teacache:0.1 fbcache:0.08 --out "${OUT:-gpu_results}/compile_speed.json"
# ---- end issue 17 ----
