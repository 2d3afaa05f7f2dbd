#!/usr/bin/env bash
# The device agent as an aarch64 board (a Raspberry Pi 4) installs it, runnable here under qemu-user:
# Debian bookworm's arm64 Python 3.11 (tools/aarch64_python_sysroot.sh) and edgeopt's wheel with its
# [agent,litert] dependencies as aarch64 wheels in a target directory (tests/device/, docs/testing.md).
#
#   tools/make_aarch64_agent_env.sh WHEEL [DIR]     # default DIR: build/device/aarch64
#   PYTHONPATH=DIR/site DIR/sysroot/usr/bin/python3.11-qemu -c 'from edgeopt.cli.agent import main; main()' --config agent.toml
#
# PIP (default .venv/bin/pip) downloads the wheels; EXTRAS (default agent,litert) picks the extras.
# Needs Debian/Ubuntu as root the first time (qemu-user-static, arm64 .debs). About 300 MB.
set -euo pipefail
WHEEL=$(realpath "${1:?usage: make_aarch64_agent_env.sh WHEEL [DIR]}")
DIR=$(realpath -m "${2:-build/device/aarch64}")
PIP=${PIP:-.venv/bin/pip}
EXTRAS=${EXTRAS:-agent,litert}

"$(dirname "$0")/aarch64_python_sysroot.sh" "$DIR"

# pip matches --platform tags exactly (no older manylinux implied), and the aarch64 wheels differ:
# ai-edge-litert 2.3 is manylinux_2_27 only, onnxruntime 1.32 manylinux_2_28, cryptography and cffi
# manylinux2014. Name every glibc up to bookworm's 2.36.
PLATFORMS=(--platform manylinux2014_aarch64)
for minor in $(seq 17 36); do PLATFORMS+=(--platform "manylinux_2_${minor}_aarch64"); done
rm -rf "$DIR/site.partial"
"$PIP" install --quiet --no-warn-script-location --target "$DIR/site.partial" "${PLATFORMS[@]}" \
    --python-version 3.11 --implementation cp --abi cp311 --only-binary=:all: "$WHEEL[$EXTRAS]"
rm -rf "$DIR/site.partial/bin"  # console scripts whose #! names this host's Python
rm -rf "$DIR/site"
mv "$DIR/site.partial" "$DIR/site"
PYTHONPATH="$DIR/site" "$DIR/sysroot/usr/bin/python3.11-qemu" -c \
    'import platform, edgeopt.agent.service; print("aarch64 agent ready:", platform.machine())'
