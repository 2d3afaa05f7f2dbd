"""Quantize modes as values: what ``--quantize X`` means, asked in one place.

Before, each consumer kept its own list of mode names (the golden tolerance its integer modes, the
tflite target its full-integer ones, the fit check its activation widths), and the int4 block size
travelled as an ONNX Runtime pass parameter that the tflite and Core ML targets picked out by string.
A ``QuantizeMode`` holds those facts and its own settings; targets and the pipeline read them from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class QuantizeMode:
    name: str
    # Integer arithmetic somewhere (weights, activations or both): outputs on another CPU differ from
    # this host's by a rounding step or two, not only by summation order (the golden tolerance).
    integer: bool = False
    # Activations computed in integers from ranges calibrated on data: bytes per activation element.
    # None: activations stay floating point (the target's own float width applies).
    activation_bytes: int | None = None
    # Settings, given as the ONNX Runtime passes' parameters of the same name (one spelling on the CLI
    # and in recipes): how activation ranges are chosen, and weights per int4 block.
    calibration_method: str | None = None
    block_size: int | None = None

    @property
    def calibrated(self) -> bool:
        """Whether the mode reads calibration data (static activation ranges)."""
        return self.activation_bytes is not None

    @property
    def compresses(self) -> bool:
        return self.name != "none"

    def __str__(self) -> str:
        return self.name


MODES: dict[str, QuantizeMode] = {m.name: m for m in (
    QuantizeMode("none"),
    QuantizeMode("fp16"),
    QuantizeMode("int8", integer=True, activation_bytes=1, calibration_method="minmax"),
    QuantizeMode("int8-dynamic", integer=True),
    QuantizeMode("int16x8", integer=True, activation_bytes=2, calibration_method="minmax"),
    QuantizeMode("int4", integer=True, block_size=32),
)}
QUANTIZE_MODES = tuple(MODES)
# the pass whose parameters carry a mode's settings, and their names
_SETTINGS_PASS = {"int8": "quantize-int8", "int16x8": "quantize-int8", "int4": "quantize-int4"}
MODE_SETTINGS = frozenset({"calibration_method", "block_size"})


def quantize_mode(name: str | QuantizeMode, pass_params: Mapping[str, Mapping[str, Any]] | None = None) -> QuantizeMode:
    """The mode called ``name``, with the settings given for it in ``pass_params`` (by pass name)."""
    if isinstance(name, QuantizeMode):
        return name
    mode = MODES[name]
    given = (pass_params or {}).get(_SETTINGS_PASS.get(name, ""), {}) or {}
    changes = {k: given[k] for k in sorted(MODE_SETTINGS) if getattr(mode, k) is not None
               and given.get(k) is not None}
    return replace(mode, **changes) if changes else mode


# target → whose INT8 it ships, which ``edgeopt analyze --target`` ranks nodes for
INT8_QUANTIZERS = {"onnx": "ONNX Runtime QDQ", "tvm": "ONNX Runtime QDQ", "tflite": "litert-quantizer",
                   "coreml": "Core ML weight compression"}
