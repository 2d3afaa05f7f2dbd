"""Delta updates: the bytes that turn one packed artifact (the base a device runs) into the next.

A delta is zstd with the base as a raw-content dictionary ("patch-from": what ``zstd --patch-from``
does), long-distance matching on and a window over base + new, so every byte run the new artifact shares
with the base — unchanged tensors, the golden inputs, most of the manifest — is a reference, and only
what changed is carried, compressed. A head-only retrain of the IMU model: 2.4 % of the full artifact
as .onnx, 2.6 % as .tflite (tests/test_delta.py). It works on any artifact format, byte for byte; the
result is checked against the full target's signed length and sha256 before anything uses it, so a
wrong base or a damaged delta can only lead to the full download.

Written on the zstandard bindings (the library does the compression; what is ours is the choice of
parameters and the checks around it).
"""

from __future__ import annotations

import hashlib

from edgeopt.errors import MissingDependency, UserInputError

CODEC = "zstd-patch-from"
LEVEL = 9  # about the size of level 19 on a head-only retrain (1,240 vs 1,101 bytes), 25x faster on 8 MB
MAX_WINDOW_LOG = 31  # zstd's limit (2 GiB): base + new must fit in the window


class DeltaError(UserInputError):
    """A delta that cannot be made or applied (too big, damaged, made from another base)."""


def _zstd():
    try:
        import zstandard
    except ImportError as exc:
        raise MissingDependency("zstandard", "agent", "delta updates") from exc
    return zstandard


def _window_log(base: int, new: int) -> int:
    log = max(20, (base + new).bit_length())
    if log > MAX_WINDOW_LOG:
        raise DeltaError(f"a delta needs base + new ≤ 2 GiB, got {base + new:,} bytes")
    return log


def make_delta(base: bytes, new: bytes) -> bytes:
    zstd = _zstd()
    window = _window_log(len(base), len(new))
    # the match finder's tables sized to the window (what `zstd --patch-from` does): at level 9's own
    # sizes a 10 MB base is mostly out of reach, and a head-only retrain's delta came out at 56 % of the
    # artifact instead of 1.9 % (benchmarks/update.py); capped at 2^25 entries (128 MiB each) for the publisher
    tables = min(max(window - 2, 22), 25)  # 22: level 9's own sizes for inputs over 256 KiB
    params = zstd.ZstdCompressionParameters.from_level(LEVEL, window_log=window, enable_ldm=True,
                                                       write_content_size=True, hash_log=tables, chain_log=tables)
    dictionary = zstd.ZstdCompressionDict(base, dict_type=zstd.DICT_TYPE_RAWCONTENT)
    return zstd.ZstdCompressor(dict_data=dictionary, compression_params=params).compress(new)


def apply_delta(base: bytes, delta: bytes, length: int) -> bytes:
    """The artifact ``delta`` makes from ``base``: exactly ``length`` bytes, or ``DeltaError``."""
    zstd = _zstd()
    dictionary = zstd.ZstdCompressionDict(base, dict_type=zstd.DICT_TYPE_RAWCONTENT)
    try:
        claimed = zstd.frame_content_size(delta)
        if claimed != length:  # before decompressing: never allocate what the frame merely claims
            raise DeltaError(f"the delta makes {claimed:,} bytes, not the {length:,} of the full artifact")
        out = zstd.ZstdDecompressor(dict_data=dictionary, max_window_size=2 ** MAX_WINDOW_LOG).decompress(
            delta, max_output_size=length)
    except zstd.ZstdError as exc:
        raise DeltaError(f"the delta does not apply: {exc}") from None
    if len(out) != length:
        raise DeltaError(f"the delta made {len(out):,} bytes, not the {length:,} of the full artifact")
    return out


def delta_path(name: str, version: str, base_sha256: str) -> str:
    """The target path of the delta to NAME@VERSION from the artifact whose sha256 is ``base_sha256``:
    a device finds it from what it runs; the signed custom fields say the rest, and are checked."""
    return f"{name}-{version}.from-{base_sha256[:16]}.zst"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
