"""Keeping the fixed part of a saved .mlpackage small.

A package is its program description (protobuf) plus one weight blob file. For a small model the
fixed costs are a visible part of it (the 47k-weight digits CNN: ~8 KB of program beside 48–96 KB
of weights), and they count twice when weights are compressed, since the fixed part does not
shrink. Two of them are settings of coremltools' serialisation:

- every op parameter is its own ``const`` op (strides, dilations, pad, groups, pad_type of every
  conv, the shape of every reshape: ~110 bytes each). coremltools' ``const_deduplication`` pass
  shares identical constants but skips those under 100 elements; here it shares them all
  (a public pass option).
- every constant of 10 elements or more goes to the blob file, where each entry has a 64-byte
  header and is padded to 64 bytes, and the program refers to it by file name and offset (~40
  bytes). A 16-channel fp16 bias is 32 bytes of data and ~200 bytes of package. Float constants of
  at most ``INLINE_MAX_BYTES`` (biases, per-channel scales, small lookup tables) are written into
  the program instead. coremltools has no option for this threshold (it is the literal ``10`` in
  ``backend.mil.load.should_use_weight_file``), so the function is wrapped while a model is
  converted or compressed; if a coremltools release renames it, packages are simply written the
  default way (the size test shows it). Large weights stay in the blob, which Core ML maps from
  disk rather than parsing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np

INLINE_MAX_BYTES = 128
_INLINE_DTYPES = (np.float16, np.float32)


def pass_pipeline(ct: Any) -> Any:
    """coremltools' default pipeline with every identical constant shared."""
    pipeline = ct.PassPipeline.DEFAULT
    pipeline.set_options("common::const_deduplication", {"const_threshold": 1})
    return pipeline


@contextlib.contextmanager
def small_constants_inline() -> Iterator[None]:
    """While active, float constants of at most ``INLINE_MAX_BYTES`` are written into the program."""
    try:
        from coremltools.converters.mil.backend.mil import load
    except ImportError:  # pragma: no cover - a coremltools without this module writes the default way
        yield
        return
    default = getattr(load, "should_use_weight_file", None)
    if default is None:  # pragma: no cover - see the module docstring
        yield
        return

    def should_use_weight_file(val, *args, **kwargs) -> bool:
        small_float = (isinstance(val, np.ndarray) and val.dtype in _INLINE_DTYPES
                       and val.nbytes <= INLINE_MAX_BYTES)
        return default(val, *args, **kwargs) and not small_float

    load.should_use_weight_file = should_use_weight_file
    try:
        yield
    finally:
        load.should_use_weight_file = default
