#!/usr/bin/env bash
# The GPU check (issue "Beyond x86"): CUDA artifacts and kernels built here, run on an NVIDIA GPU.
#
#   bash scripts/gpu_check.sh prepare [ARGS]   # here: needs dlrmc installed and nvcc; no GPU.
#                                              # Writes .gpu/ (~20 MB: the kernels' library,
#                                              # artifacts without their weights, TVM's runtime
#                                              # only, dlrmc's runtime). ARGS go to
#                                              # `python -m dlrmc.bench.gpu prepare`.
#   bash scripts/gpu_check.sh run [OUT_DIR]    # there: python3 with PyTorch and a GPU; no TVM.
#                                              # The kernels against numpy oracles and the
#                                              # artifacts against PyTorch on the GPU, then the
#                                              # benchmark (B=64 and 2048, Kaggle MLPs, 26 x 100k
#                                              # tables, one-hot) against eager, CUDA-graph
#                                              # replay and torch.compile; a few minutes.
# With the device tool: carry ".gpu", command "bash scripts/gpu_check.sh run $OUT".
# GPU_BUNDLE names another bundle folder (default .gpu). A bundle prepared with
# `--target llvm --python none` rehearses the run on a CPU (the suite does).
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE="${GPU_BUNDLE:-.gpu}"
case "${1:-}" in
  prepare)
    shift
    python -m dlrmc.bench.gpu prepare "$BUNDLE" "$@" ;;
  run)
    OUT="${2:-$BUNDLE/out}"
    shopt -s nullglob
    wheels=("$BUNDLE"/wheels/*.whl)
    if (( ${#wheels[@]} )); then
      python3 -m pip install -q --no-index --no-deps --target "$BUNDLE/site" "${wheels[@]}"
    fi
    SITE="$(cd "$BUNDLE/site" && pwd)"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" TVM_USE_RUNTIME_LIB=1
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || true
    mkdir -p "$OUT"
    PYTHONUNBUFFERED=1 python3 -m dlrmc.bench.gpu run "$BUNDLE" --out "$OUT" 2>&1 | tee "$OUT/gpu_check.log"
    ;;
  *)
    echo "usage: $0 prepare [ARGS] | run [OUT_DIR]" >&2; exit 2 ;;
esac
