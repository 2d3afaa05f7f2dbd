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

    ``batch_axis`` is the axis samples are stacked along in one call (``edgeopt.batching``): 0 for
    most tensors, 1 for a recurrent state shaped [layers, batch, hidden], None for a tensor that is
    the same whole for every sample of a call (a scalar sample rate) or holds exactly one sample.
    """

    name: str
    shape: tuple[Dim, ...]
    dtype: str
    quantization: dict[str, Any] = field(default_factory=dict)
    batch_axis: int | None = 0

    def __post_init__(self) -> None:
        if self.batch_axis is not None and not 0 <= self.batch_axis < max(len(self.shape), 1):
            if not self.shape and self.batch_axis == 0:
                object.__setattr__(self, "batch_axis", None)  # a scalar has no axis to stack along
            else:
                raise ValueError(f"tensor '{self.name}': batch axis {self.batch_axis} is outside its "
                                 f"{len(self.shape)} dims")

    @property
    def is_dynamic(self) -> bool:
        return any(not isinstance(d, int) or d < 0 for d in self.shape)

    @property
    def batch_dim_dynamic(self) -> bool:
        axis = self.batch_axis
        return axis is not None and not (isinstance(self.shape[axis], int) and self.shape[axis] > 0)

    @property
    def batch_size(self) -> int | None:
        """The size of the batch axis when it is fixed, else None (dynamic, or no batch axis)."""
        if self.batch_axis is None or self.batch_dim_dynamic:
            return None
        return int(self.shape[self.batch_axis])  # type: ignore[arg-type]

    def dynamic_dims(self) -> list[int]:
        return [i for i, d in enumerate(self.shape) if not isinstance(d, int) or d < 0]

    def sample_shape(self) -> tuple[Dim, ...]:
        """The shape of one sample: every dim but the batch axis (all of them without one)."""
        if self.batch_axis is None:
            return tuple(self.shape)
        return tuple(d for i, d in enumerate(self.shape) if i != self.batch_axis)

    def concrete_shape(self, batch: int = 1) -> tuple[int, ...]:
        """The shape with a dynamic batch axis set to ``batch``; other dims must be fixed."""
        dims = []
        for i, d in enumerate(self.shape):
            if isinstance(d, int) and d > 0:
                dims.append(d)
            elif i == self.batch_axis:
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
        out["batch_axis"] = self.batch_axis
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> TensorSpec:
        """From a manifest entry; one written before ``batch_axis`` existed has its batch on axis 0."""
        shape = tuple(d if isinstance(d, int) else str(d) for d in obj["shape"])
        axis = obj.get("batch_axis", 0)
        return cls(obj["name"], shape, str(obj["dtype"]), dict(obj.get("quantization") or {}),
                   None if axis is None else int(axis))


def dtype_name(dtype: Any) -> str:
    return np.dtype(dtype).name
