#!/usr/bin/env bash
# Build an aarch64 Python 3.11 + TVM runtime that runs on an x86-64 host under qemu-user, so the
# aarch64 libraries `edgeopt convert --target tvm --profile raspberry-pi-4` writes can be run here
# (tests/test_tvm_aarch64_emulation.py, docs/tvm.md).
#
#   tools/make_aarch64_emulation_env.sh [DIR]      # default: build/qemu-aarch64
#
# The aarch64 Python comes from tools/aarch64_python_sysroot.sh (Debian/Ubuntu with apt-get as root,
# qemu-user-static); pip fetches aarch64 wheels of apache-tvm, apache-tvm-ffi, numpy. About 500 MB.
# (The device agent's aarch64 environment: tools/make_aarch64_agent_env.sh.)
set -euo pipefail
DIR=$(realpath -m "${1:-build/qemu-aarch64}")
PIP=${PIP:-.venv/bin/pip}
TVM_VERSION=$(.venv/bin/python -c 'from importlib.metadata import version; print(version("apache-tvm"))')
FFI_VERSION=$(.venv/bin/python -c 'from importlib.metadata import version; print(version("apache-tvm-ffi"))')

"$(dirname "$0")/aarch64_python_sysroot.sh" "$DIR"

"$PIP" download -q --no-deps --only-binary=:all: --platform manylinux_2_28_aarch64 --python-version 3.11 \
    --implementation cp -d "$DIR/wheels" "apache-tvm==$TVM_VERSION" "apache-tvm-ffi==$FFI_VERSION" numpy \
    ml_dtypes typing_extensions
"$PIP" install -q --no-deps --upgrade --target "$DIR/site" --platform manylinux_2_28_aarch64 \
    --only-binary=:all: --python-version 3.11 "$DIR"/wheels/*.whl
QEMU=$(command -v qemu-aarch64-static || command -v qemu-aarch64)
PYTHONPATH="$DIR/site" "$QEMU" -L "$DIR/sysroot" "$DIR/sysroot/usr/bin/python3.11" -c \
    'import platform, tvm; print("aarch64 TVM runtime ready:", platform.machine(), tvm.__version__)'
