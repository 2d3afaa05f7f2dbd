"""Delta updates: the bytes that turn one packed artifact (the base a device runs) into the next.

A delta is zstd with the base as a raw-content dictionary ("patch-from": what ``zstd --patch-from``
does), long-distance matching on and a window over base + new, so every byte run the new artifact shares
with the base — unchanged tensors, the golden inputs, most of the manifest — is a reference, and only
what changed is carried, compressed. A head-only retrain of the IMU model: 2.4 % of the full artifact
as .onnx, 2.6 % as .tflite (tests/test_delta.py). It works on any artifact format, byte for byte; the
result is checked against the full target's signed length and sha256 before anything uses it, so a
wrong base or a damaged delta can only lead to the full download.

A whole-network fine-tune moves every weight a little, so no byte run matches and patch-from carries
nearly everything. For that the publisher names the tensors the two artifacts share (same name, same
size: ``edgeopt.fleet.tensor_spans`` reads .onnx and .tflite files) and the delta carries each one
XORed with its base tensor, its bytes regrouped by their place in the element (``width``: the float's
sign and exponent bytes, which a small change leaves alone, come out as runs of zeros) — codec
``zstd-patch-from+xor``. The device needs no model parser: the regions are listed in the delta's
header, in archive offsets. The publisher makes both kinds and signs the XOR one where it is clearly
smaller (``edgeopt.fleet.tensor_spans.chosen_delta``).

Written on the zstandard bindings (the library does the compression; what is ours is the choice of
parameters, the XOR transform — which no delta library offers per tensor — and the checks around it).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from edgeopt.errors import MissingDependency, UserInputError

CODEC = "zstd-patch-from"
CODEC_XOR = "zstd-patch-from+xor"
CODECS = (CODEC, CODEC_XOR)
XOR_MAGIC = b"EOXD\x01"  # then the region count (u32) and the regions, then the zstd frame
_REGION = struct.Struct("<QQQB")
MAX_REGIONS = 1 << 20
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


@dataclass(frozen=True)
class Region:
    """A tensor the new artifact shares with the base: ``length`` bytes at ``start`` in the new archive
    and at ``base`` in the base archive, of elements ``width`` bytes wide."""

    start: int
    length: int
    base: int
    width: int = 1


def make_delta(base: bytes, new: bytes, regions: Sequence[Region] = ()) -> bytes:
    """The delta that makes ``new`` from ``base``; with ``regions``, the XOR kind (``CODEC_XOR``)."""
    if not regions:
        return _patch_from(base, new)
    regions = _checked(regions, len(base), len(new))
    out = bytearray(new)
    for r in regions:
        out[r.start:r.start + r.length] = _planes(_xor(new[r.start:r.start + r.length], base[r.base:r.base + r.length]),
                                                  r.width)
    header = XOR_MAGIC + struct.pack("<I", len(regions)) + b"".join(
        _REGION.pack(r.start, r.length, r.base, r.width) for r in regions)
    return header + _patch_from(base, bytes(out))


def _patch_from(base: bytes, new: bytes) -> bytes:
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


def apply_delta(base: bytes, delta: bytes, length: int, codec: str = CODEC) -> bytes:
    """The artifact ``delta`` (of the signed ``codec``) makes from ``base``: exactly ``length`` bytes,
    or ``DeltaError``."""
    if codec == CODEC:
        return _unpatch(base, delta, length)
    if codec != CODEC_XOR:
        raise DeltaError(f"unknown delta codec {codec!r}")
    regions, frame = _read_header(delta, len(base), length)
    out = bytearray(_unpatch(base, frame, length))
    for r in regions:
        out[r.start:r.start + r.length] = _xor(_unplanes(bytes(out[r.start:r.start + r.length]), r.width),
                                               base[r.base:r.base + r.length])
    return bytes(out)


def _unpatch(base: bytes, delta: bytes, length: int) -> bytes:
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


def _xor(a: bytes, b: bytes) -> bytes:
    import numpy as np  # 7 ms for 10 MB, against 40 ms through Python's big integers

    return np.bitwise_xor(np.frombuffer(a, np.uint8), np.frombuffer(b, np.uint8)).tobytes()


def _planes(data: bytes, width: int) -> bytes:
    """Byte i of every element, for each i in turn (a tail shorter than an element stays as it is)."""
    if width <= 1:
        return data
    whole = len(data) - len(data) % width
    return b"".join(data[i:whole:width] for i in range(width)) + data[whole:]


def _unplanes(data: bytes, width: int) -> bytes:
    if width <= 1:
        return data
    whole = len(data) - len(data) % width
    out = bytearray(len(data))
    count = whole // width
    for i in range(width):
        out[i:whole:width] = data[i * count:(i + 1) * count]
    out[whole:] = data[whole:]
    return bytes(out)


def _checked(regions: Sequence[Region], base_len: int, new_len: int) -> list[Region]:
    """The regions in order, each inside both archives and none overlapping another (a listed region
    is authenticated with the delta, but is still checked before it is used)."""
    regions = sorted(regions, key=lambda r: r.start)
    if len(regions) > MAX_REGIONS:
        raise DeltaError(f"a delta lists at most {MAX_REGIONS:,} regions, got {len(regions):,}")
    end = 0
    for r in regions:
        if (r.length <= 0 or r.start < end or r.start + r.length > new_len or r.base < 0
                or r.base + r.length > base_len or not 1 <= r.width <= 8):
            raise DeltaError(f"delta region {r} is outside the artifacts or overlaps another")
        end = r.start + r.length
    return regions


def _read_header(delta: bytes, base_len: int, new_len: int) -> tuple[list[Region], bytes]:
    if not delta.startswith(XOR_MAGIC) or len(delta) < len(XOR_MAGIC) + 4:
        raise DeltaError("the delta does not apply: no XOR delta header")
    (count,) = struct.unpack_from("<I", delta, len(XOR_MAGIC))
    start = len(XOR_MAGIC) + 4
    end = start + count * _REGION.size
    if count > MAX_REGIONS or end > len(delta):
        raise DeltaError("the delta does not apply: its header is cut short or lists too many regions")
    regions = [Region(*_REGION.unpack_from(delta, start + i * _REGION.size)) for i in range(count)]
    return _checked(regions, base_len, new_len), delta[end:]


def delta_path(name: str, version: str, base_sha256: str) -> str:
    """The target path of the delta to NAME@VERSION from the artifact whose sha256 is ``base_sha256``:
    a device finds it from what it runs; the signed custom fields say the rest, and are checked."""
    return f"{name}-{version}.from-{base_sha256[:16]}.zst"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
