#!/usr/bin/env bash
# Fetch the aarch64 TVM runtime (libtvm_runtime.so, libtvm_ffi.so) from PyPI's aarch64 wheels
# of the apache-tvm / apache-tvm-ffi versions installed here, into DEST (default
# ~/.cache/dlrmc/aarch64-tvm): what the C++ runner links against for aarch64 and what
# tests/test_cpp_runtime.py runs under qemu-aarch64.
set -euo pipefail
DEST="${1:-${DLRMC_AARCH64_TVM_LIBS:-$HOME/.cache/dlrmc/aarch64-tvm}}"
if [[ -f "$DEST/libtvm_runtime.so" && -f "$DEST/libtvm_ffi.so" ]]; then
  echo "aarch64 TVM runtime already in $DEST"; exit 0
fi
TVM_VERSION=$(python -c "from importlib.metadata import version; print(version('apache-tvm'))")
FFI_VERSION=$(python -c "from importlib.metadata import version; print(version('apache-tvm-ffi'))")
WHEELS=$(mktemp -d)
trap 'rm -rf "$WHEELS"' EXIT
python -m pip download -q --no-deps --only-binary=:all: --python-version 311 \
  --platform manylinux2014_aarch64 --platform manylinux_2_28_aarch64 \
  "apache-tvm==$TVM_VERSION" "apache-tvm-ffi==$FFI_VERSION" -d "$WHEELS"
mkdir -p "$DEST"
python - "$WHEELS" "$DEST" <<'PY'
import glob, os, sys, zipfile
wheels, dest = sys.argv[1], sys.argv[2]
want = {"tvm/lib/libtvm_runtime.so", "tvm_ffi/lib/libtvm_ffi.so"}
for wheel in glob.glob(os.path.join(wheels, "*.whl")):
    with zipfile.ZipFile(wheel) as z:
        for name in want & set(z.namelist()):
            with open(os.path.join(dest, os.path.basename(name)), "wb") as f:
                f.write(z.read(name))
PY
echo "aarch64 TVM runtime in $DEST"
