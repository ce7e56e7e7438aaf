#!/usr/bin/env bash
# The GPU benchmark in one command, for a lent H100/H200 (no network, no installs: torch and
# torchvision from the machine's image, mmfl from this checkout). Results go to $OUT (or
# ./bench-out): gpu_bench.json, gpu_bench.md and gpu_bench.log. Runs in under 5 minutes.
#   bash bench/gpu.sh            # the full run
#   bash bench/gpu.sh --smoke    # tiny, on CPU (what CI runs through the test suite)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench-out}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python="${PYTHON:-}"  # else the checkout's .venv when there is one (a dev machine), else python3 (the GPU image)
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python="$(command -v python3 || command -v python)"; fi
fi
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
fi
"$python" bench/gpu_bench.py --out "$out" "$@" 2>&1 | tee "$out/gpu_bench.log"
