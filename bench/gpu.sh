#!/usr/bin/env bash
# The GPU session in one command, for a lent H100/H200 (no network, no installs: torch and
# torchvision from the machine's image, mmfl from this checkout). Results go to $OUT (or
# ./bench-out): gpu_bench.{json,md,log}, gpu_profile*.txt, gpu_tests.log (the GPU-only tests), and
# with a real-photo source also realphoto_cuda.{json,log}.
#   bash bench/gpu.sh            # the GPU benchmark (issue 8), under 5 minutes
#   bash bench/gpu.sh --smoke    # tiny, on CPU (what CI runs through the test suite)
#   bash bench/gpu.sh --sections e2e   # the input pipelines alone: CPU-worker JPEG loader vs
#                                      # data.decode=gpu (nvJPEG + augmentation on the GPU)
# Then, when REALPHOTO_SRC names a clothing-small folder, the real-photo benchmark on the GPU
# (bench/realphoto.py --device cuda), stopped after REALPHOTO_TIMEOUT_S seconds (default 270;
# it writes its JSON after every variant, so a stop keeps what finished). REALPHOTO_ITEMS caps
# the training items (the seeded subset bench/realphoto.py --items would pick), REALPHOTO_VARIANTS
# orders the variants, REALPHOTO_PROTOCOL picks the views (default hard: the standard views are
# saturated at this size; hard adds 2,000 distractor photos from the train split, so it trains on
# the other 1,068 unless REALPHOTO_ITEMS says otherwise).
# Extra arguments go to bench/gpu_bench.py.
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
status=0
"$python" bench/gpu_bench.py --out "$out" "$@" 2>&1 | tee "$out/gpu_bench.log" || status=$?
# The tests that only a GPU can run (CUDA-graph parity, the graphed trainer, bf16 losses, nvJPEG), when the
# image has pytest; GPU_TESTS=0 skips them (about 40 s).
if [ "${GPU_TESTS:-1}" != 0 ] && "$python" -c "import pytest, torch; assert torch.cuda.is_available()" 2>/dev/null; then
  "$python" -m pytest -q -p no:cacheprovider tests/test_cuda_graph.py tests/test_losses.py -k "cuda or gpu" \
    2>&1 | tee "$out/gpu_tests.log" || status=$?
  "$python" -m pytest -q -p no:cacheprovider tests/test_gpu_decode.py -k "cuda" \
    2>&1 | tee -a "$out/gpu_tests.log" || status=$?
fi
if [ -n "${REALPHOTO_SRC:-}" ]; then
  protocol="${REALPHOTO_PROTOCOL:-hard}"
  items="${REALPHOTO_ITEMS:-}"
  if [ "$protocol" = hard ] && [ -z "$items" ]; then items=1068; fi
  variants="${REALPHOTO_VARIANTS:-mmfl,mgn,mmfl-fuse345,mmfl+frozen-bn,+batch-hard,+improved,global,imagenet-only}"
  timeout "${REALPHOTO_TIMEOUT_S:-270}" "$python" bench/realphoto.py --device cuda --src "$REALPHOTO_SRC" \
    --protocol "$protocol" ${items:+--items "$items"} --seeds 0 --variants "$variants" --quiet \
    --work "${TMPDIR:-/tmp}/mmfl-realphoto-cuda" --json "$out/realphoto_cuda.json" 2>&1 \
    | tee "$out/realphoto_cuda.log" || status=$?
fi
exit "$status"
