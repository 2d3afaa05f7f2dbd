#!/usr/bin/env bash
# An aarch64 Python 3.11 (Debian bookworm's arm64 .debs, unpacked, not installed) that runs on an
# x86-64 host under qemu-user. Used by make_aarch64_emulation_env.sh (TVM runtime) and
# make_aarch64_agent_env.sh (the device agent).
#
#   tools/aarch64_python_sysroot.sh DIR      # writes DIR/sysroot and DIR/sysroot/usr/bin/python3.11-qemu
#
# Reuses DIR/sysroot when it was made from the same package list. Needs Debian/Ubuntu with apt-get
# as root: qemu-user-static is installed when missing, and arm64 is added as a foreign architecture
# only for the download (removed again). About 60 MB.
#
# DIR/sysroot/usr/bin/python3.11-qemu is a host script that starts that Python under qemu, emulating
# a Raspberry Pi 4's CPU (Cortex-A72), with itself as argv[0]: so sys.executable names it, and a
# child Python (the agent's self-test runs in one) starts under qemu too, as it would on a board —
# no binfmt_misc registration needed. DIR/sysroot/proc/cpuinfo is what that board's kernel reports:
# qemu 7.2 shows the guest the host's x86 /proc/cpuinfo, and the cpuinfo library inside ONNX Runtime
# and LiteRT (XNNPACK) finds no ARM core in it and crashes at load (SIGSEGV); qemu -L serves the
# sysroot's copy instead.
set -euo pipefail
DIR=$(realpath -m "${1:?usage: aarch64_python_sysroot.sh DIR}")
PACKAGES="python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libexpat1 zlib1g libffi8 libbz2-1.0
  liblzma5 libssl3 libsqlite3-0 libuuid1 libncursesw6 libtinfo6 libreadline8 libcrypt1 libnsl2 libtirpc3
  libdb5.3 libgdbm6 libstdc++6 libgcc-s1 libc6 libgssapi-krb5-2 libkrb5-3 libk5crypto3 libkrb5support0
  libcom-err2 libkeyutils1"
STAMP="$DIR/sysroot/.packages"

command -v apt-get >/dev/null || { echo "error: needs apt-get (Debian/Ubuntu)" >&2; exit 2; }
if ! command -v qemu-aarch64-static >/dev/null; then
    [ "$(id -u)" = 0 ] || { echo "error: needs qemu-user-static (apt-get install qemu-user-static, as root)" >&2; exit 2; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static >/dev/null 2>&1 || {
        apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static >/dev/null; }
fi

if [ ! -x "$DIR/sysroot/usr/bin/python3.11" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$(echo $PACKAGES)" ]; then
    [ "$(id -u)" = 0 ] || { echo "error: needs root for apt-get (arm64 .debs of python3.11)" >&2; exit 2; }
    rm -rf "$DIR/debs" "$DIR/sysroot"
    mkdir -p "$DIR/debs" "$DIR/sysroot"
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
    rm -rf "$DIR/debs"
    echo $PACKAGES > "$STAMP"
fi

mkdir -p "$DIR/sysroot/proc"
for ((cpu = 0; cpu < $(nproc); cpu++)); do
    printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\n' $cpu
    printf 'CPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n'
done > "$DIR/sysroot/proc/cpuinfo"
printf 'Hardware\t: BCM2835\nRevision\t: c03111\nModel\t\t: Raspberry Pi 4 Model B Rev 1.1\n' >> "$DIR/sysroot/proc/cpuinfo"

cat > "$DIR/sysroot/usr/bin/python3.11-qemu" <<'WRAPPER'
#!/bin/sh
# aarch64 python3.11 under qemu-user on a Cortex-A72 (tools/aarch64_python_sysroot.sh); argv[0] = this script.
self=$(readlink -f "$0")
sysroot=${self%/usr/bin/*}
exec qemu-aarch64-static -cpu cortex-a72 -L "$sysroot" -0 "$self" "$sysroot/usr/bin/python3.11" "$@"
WRAPPER
chmod 755 "$DIR/sysroot/usr/bin/python3.11-qemu"
"$DIR/sysroot/usr/bin/python3.11-qemu" -c 'import platform, sys; print("aarch64 Python ready:", platform.machine(), sys.version.split()[0])'
