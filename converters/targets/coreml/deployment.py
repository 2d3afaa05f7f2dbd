"""Core ML deployment targets: which OS releases run which Core ML specification.

coremltools names one opset per OS generation (``ct.target.iOS16 == ct.target.macOS13`` ...); this
table holds the same facts without importing coremltools, so a refused combination (INT4 weights
for an iOS 17 phone) is reported before any work starts.
"""

from __future__ import annotations

# Core ML specification version per OS release (as in coremltools' ``ct.target``).
SPEC_VERSIONS: dict[str, int] = {
    **{f"iOS{v}": v - 9 for v in range(15, 19)},
    **{f"macOS{v}": v - 6 for v in range(12, 16)},
    **{f"tvOS{v}": v - 9 for v in range(15, 19)},
    **{f"watchOS{v}": v - 2 for v in range(8, 12)},
}

DEPLOYMENT_TARGETS = tuple(SPEC_VERSIONS)
ML_PROGRAM = 6          # iOS 15: the first release that runs ML Programs
COMPRESSED_WEIGHTS = 7  # iOS 16: constexpr ops (affine int8, LUT, sparse weights)
BLOCKWISE_INT4 = 9      # iOS 18: constexpr_blockwise_shift_scale (int4 per-block), per-channel LUTs

DEFAULT_DEPLOYMENT_TARGET = "iOS16"


def deployment_target(text: str) -> str:
    """'ios 17' / 'IOS17' / 'macOS 14' → the canonical name; an unknown name is returned unchanged so
    the parameter check can list the valid ones."""
    key = str(text).replace(" ", "").replace("_", "").lower()
    for name in SPEC_VERSIONS:
        if name.lower() == key:
            return name
    return str(text)


def releases_for(spec_version: int) -> str:
    """'iOS 18 / macOS 15 / tvOS 18 / watchOS 11' for a specification version."""
    names = [n for n, v in SPEC_VERSIONS.items() if v == spec_version]
    return " / ".join(n.replace("OS", "OS ", 1) for n in names)
