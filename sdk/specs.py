"""Tensor specifications shared by data loading, runtimes, the manifest and validation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

Dim = int | str | None  # a fixed size, a symbolic name ("batch"), or unknown


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: name, shape (dims may be symbolic) and numpy dtype name.

    ``quantization`` holds scale / zero-point for integer tensors of a quantized model (the device
    needs them to feed and read raw integer tensors), or is empty.
    """

    name: str
    shape: tuple[Dim, ...]
    dtype: str
    quantization: dict[str, Any] = field(default_factory=dict)

    @property
    def is_dynamic(self) -> bool:
        return any(not isinstance(d, int) or d < 0 for d in self.shape)

    @property
    def batch_dim_dynamic(self) -> bool:
        return bool(self.shape) and not (isinstance(self.shape[0], int) and self.shape[0] > 0)

    def dynamic_dims(self) -> list[int]:
        return [i for i, d in enumerate(self.shape) if not isinstance(d, int) or d < 0]

    def sample_shape(self) -> tuple[Dim, ...]:
        """The shape of one sample: every dim after the leading batch dim."""
        return tuple(self.shape[1:])

    def concrete_shape(self, batch: int = 1) -> tuple[int, ...]:
        """The shape with a dynamic leading dim set to ``batch``; other dims must be fixed."""
        dims = []
        for i, d in enumerate(self.shape):
            if isinstance(d, int) and d > 0:
                dims.append(d)
            elif i == 0:
                dims.append(batch)
            else:
                raise ValueError(f"input '{self.name}' has a dynamic dim {i} ({d!r})")
        return tuple(dims)

    def describe_shape(self) -> str:
        return "[" + ", ".join("?" if d is None else str(d) for d in self.shape) + "]"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "shape": [d if isinstance(d, int) else (d or "?") for d in self.shape],
            "dtype": self.dtype,
        }
        if self.quantization:
            out["quantization"] = self.quantization
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> TensorSpec:
        shape = tuple(d if isinstance(d, int) else str(d) for d in obj["shape"])
        return cls(obj["name"], shape, str(obj["dtype"]), dict(obj.get("quantization") or {}))


def dtype_name(dtype: Any) -> str:
    return np.dtype(dtype).name
