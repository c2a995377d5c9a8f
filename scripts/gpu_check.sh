#!/usr/bin/env bash
# The GPU check (issue "Beyond x86"): CUDA artifacts built here, run on an NVIDIA GPU.
#
#   bash scripts/gpu_check.sh prepare          # here: needs dlrmc installed and nvcc; no GPU.
#                                              # Writes .gpu/ (~30 MB: artifacts without their
#                                              # weights, TVM's runtime only, dlrmc's runtime)
#   bash scripts/gpu_check.sh run [OUT_DIR]    # there: python3 with PyTorch and a GPU; no TVM.
#                                              # GPU checks against PyTorch, then the benchmark
#                                              # (B=64 and 2048, Kaggle MLPs, 26 x 100k tables,
#                                              # one-hot) against eager, CUDA-graph replay and
#                                              # torch.compile; a few minutes.
# With the device tool: carry ".gpu", command "bash scripts/gpu_check.sh run $OUT".
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=.gpu
case "${1:-}" in
  prepare)
    python -m dlrmc.bench.gpu prepare "$BUNDLE" ;;
  run)
    OUT="${2:-$BUNDLE/out}"
    python3 -m pip install -q --no-index --no-deps --target "$BUNDLE/site" "$BUNDLE"/wheels/*.whl
    export PYTHONPATH="$PWD/$BUNDLE/site${PYTHONPATH:+:$PYTHONPATH}" TVM_USE_RUNTIME_LIB=1
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
    mkdir -p "$OUT"
    PYTHONUNBUFFERED=1 python3 -m dlrmc.bench.gpu run "$BUNDLE" --out "$OUT" 2>&1 | tee "$OUT/gpu_check.log"
    ;;
  *)
    echo "usage: $0 prepare | run [OUT_DIR]" >&2; exit 2 ;;
esac
