#!/usr/bin/env bash
# Build an aarch64 Python 3.11 + TVM runtime that runs on an x86-64 host under qemu-user, so the
# aarch64 libraries `edgeopt convert --target tvm --profile raspberry-pi-4` writes can be run here
# (tests/test_tvm_aarch64_emulation.py, docs/tvm.md).
#
#   tools/make_aarch64_emulation_env.sh [DIR]      # default: build/qemu-aarch64
#
# Needs Debian/Ubuntu with apt-get as root (arm64 .debs of python3.11 and its libraries are
# downloaded, not installed: arm64 is added as a foreign architecture only for the download and
# removed again), qemu-user-static, and pip (aarch64 wheels of apache-tvm, apache-tvm-ffi, numpy).
# About 500 MB on disk.
set -euo pipefail
DIR=$(realpath -m "${1:-build/qemu-aarch64}")
PIP=${PIP:-.venv/bin/pip}
TVM_VERSION=$(.venv/bin/python -c 'from importlib.metadata import version; print(version("apache-tvm"))')
FFI_VERSION=$(.venv/bin/python -c 'from importlib.metadata import version; print(version("apache-tvm-ffi"))')

command -v apt-get >/dev/null || { echo "error: needs apt-get (Debian/Ubuntu)"; exit 2; }
[ "$(id -u)" = 0 ] || { echo "error: needs root for apt-get"; exit 2; }
command -v qemu-aarch64-static >/dev/null || command -v qemu-aarch64 >/dev/null || \
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static

mkdir -p "$DIR/debs" "$DIR/sysroot"
PACKAGES="python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libexpat1 zlib1g libffi8 libbz2-1.0
  liblzma5 libssl3 libsqlite3-0 libuuid1 libncursesw6 libtinfo6 libreadline8 libcrypt1 libnsl2 libtirpc3
  libdb5.3 libgdbm6 libstdc++6 libgcc-s1 libc6 libgssapi-krb5-2 libkrb5-3 libk5crypto3 libkrb5support0
  libcom-err2 libkeyutils1"
added=0
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    dpkg --add-architecture arm64
    added=1
fi
restore() { if [ "$added" = 1 ]; then dpkg --remove-architecture arm64; apt-get update -qq >/dev/null 2>&1 || true; fi; }
trap restore EXIT
apt-get update -qq >/dev/null
( cd "$DIR/debs" && for p in $PACKAGES; do apt-get download -qq -o APT::Sandbox::User=root "$p:arm64"; done )
for deb in "$DIR"/debs/*.deb; do dpkg -x "$deb" "$DIR/sysroot"; done

"$PIP" download -q --no-deps --only-binary=:all: --platform manylinux_2_28_aarch64 --python-version 3.11 \
    --implementation cp -d "$DIR/wheels" "apache-tvm==$TVM_VERSION" "apache-tvm-ffi==$FFI_VERSION" numpy \
    ml_dtypes typing_extensions
"$PIP" install -q --no-deps --upgrade --target "$DIR/site" --platform manylinux_2_28_aarch64 \
    --only-binary=:all: --python-version 3.11 "$DIR"/wheels/*.whl
QEMU=$(command -v qemu-aarch64-static || command -v qemu-aarch64)
PYTHONPATH="$DIR/site" "$QEMU" -L "$DIR/sysroot" "$DIR/sysroot/usr/bin/python3.11" -c \
    'import platform, tvm; print("aarch64 TVM runtime ready:", platform.machine(), tvm.__version__)'
