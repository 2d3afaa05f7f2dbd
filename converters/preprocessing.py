"""The manifest's ``preprocessing``: how a device turns a sensor stream into model inputs.

    {"window": 64, "hop": 32, "layout": "channels_first", "channels": ["ax", "ay", "az"],
     "sample_rate_hz": 50.0, "normalization": {"mean": [...], "std": [...]}}

``window`` samples of every channel make one model input, laid out [C, T] (``channels_first``) or
[T, C] (``channels_last``); a new window starts every ``hop`` samples; each channel is normalized as
``(x - mean) / std``. ``channels`` names the channels in the model's order (null: any source order
is taken as the model's). For a one-input model shaped [N, C, T], [N, T, C] or [N, T] the defaults
come from the input shape (the smaller of the two dims is taken as the channels); other models get
nulls and reject preprocessing options.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from edgeopt.errors import UserInputError
from edgeopt.specs import TensorSpec

LAYOUTS = ("channels_first", "channels_last")
KEYS = ("window", "hop", "layout", "channels", "sample_rate_hz", "normalization")
NULL = dict.fromkeys(KEYS)


def load_preprocessing_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserInputError(f"preprocessing file not found: {path}") from None
    except ValueError as exc:
        raise UserInputError(f"{path}: malformed JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserInputError(f"{path}: expected a JSON object with keys {', '.join(KEYS)}")
    return data


def parse_normalize(text: str) -> dict[str, list[float]]:
    """'MEAN:STD' (every channel) or 'MEAN:STD,MEAN:STD,...' (one pair per channel)."""
    means, stds = [], []
    for part in text.split(","):
        mean, sep, std = part.strip().partition(":")
        try:
            if not sep:
                raise ValueError
            means.append(float(mean))
            stds.append(float(std))
        except ValueError:
            raise UserInputError(f"--normalize: expected MEAN:STD[,MEAN:STD...], got {text!r}") from None
    return {"mean": means, "std": stds}


def _layout_of(sample: tuple, layout: str | None, n_channels: int | None, name: str) -> tuple[str, int, int]:
    """(layout, channels, window) for a per-sample shape [a, b] or [T]."""
    if len(sample) == 1:
        if layout == "channels_first":
            raise UserInputError(f"input '{name}' is [N, T] (one channel): layout must be channels_last")
        return "channels_last", 1, int(sample[0])
    a, b = int(sample[0]), int(sample[1])
    if layout is None and n_channels is not None:
        layout = "channels_first" if a == n_channels else "channels_last" if b == n_channels else None
        if layout is None:
            raise UserInputError(f"{n_channels} channels do not fit input '{name}' of shape [N, {a}, {b}]")
    layout = layout or ("channels_first" if a <= b else "channels_last")
    return (layout, a, b) if layout == "channels_first" else (layout, b, a)


def resolve_preprocessing(specs: list[TensorSpec], given: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest's preprocessing for a model with inputs ``specs``: ``given`` (from the CLI or a
    file; any key may be missing) checked against the input shape, and defaults for the rest."""
    given = {k: v for k, v in (given or {}).items() if v is not None}
    unknown = set(given) - set(KEYS)
    if unknown:
        raise UserInputError(f"preprocessing: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(KEYS)})")
    sensor_shaped = len(specs) == 1 and len(specs[0].shape) in (2, 3) and all(
        isinstance(d, int) and d > 0 for d in specs[0].shape[1:])
    if not sensor_shaped:
        if given:
            shapes = ", ".join(f"'{s.name}' {s.describe_shape()}" for s in specs)
            raise UserInputError(f"preprocessing options apply to a one-input model shaped [N, C, T], [N, T, C] "
                                 f"or [N, T]; this model has {shapes}")
        return dict(NULL)
    spec = specs[0]
    layout = given.get("layout")
    if layout is not None and layout not in LAYOUTS:
        raise UserInputError(f"preprocessing: layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    channels = given.get("channels")
    if channels is not None and (not isinstance(channels, list) or not channels
                                 or not all(isinstance(c, str) and c for c in channels)
                                 or len(set(channels)) != len(channels)):
        raise UserInputError(f"preprocessing: channels must be a list of distinct names, got {channels!r}")
    layout, n_ch, window = _layout_of(spec.sample_shape(), layout, len(channels) if channels else None, spec.name)
    if channels is not None and len(channels) != n_ch:
        raise UserInputError(f"preprocessing: {len(channels)} channel names for input '{spec.name}' "
                             f"{spec.describe_shape()}, which has {n_ch} channels ({layout})")
    if "window" in given and given["window"] != window:
        raise UserInputError(f"preprocessing: window {given['window']} does not match input '{spec.name}' "
                             f"{spec.describe_shape()} ({layout}: window {window})")
    hop = given.get("hop", window)
    if not isinstance(hop, int) or isinstance(hop, bool) or hop < 1:
        raise UserInputError(f"preprocessing: hop must be a positive integer, got {hop!r}")
    rate = given.get("sample_rate_hz")
    if rate is not None and (not isinstance(rate, int | float) or isinstance(rate, bool) or not rate > 0):
        raise UserInputError(f"preprocessing: sample_rate_hz must be a positive number, got {rate!r}")
    return {"window": window, "hop": hop, "layout": layout, "channels": channels,
            "sample_rate_hz": None if rate is None else float(rate),
            "normalization": _normalization(given.get("normalization"), n_ch)}


def _normalization(norm: Any, n_ch: int) -> dict[str, list[float]] | None:
    if norm is None:
        return None
    if not isinstance(norm, dict) or set(norm) != {"mean", "std"}:
        raise UserInputError(f"preprocessing: normalization must be {{'mean': [...], 'std': [...]}}, got {norm!r}")
    out = {}
    for k in ("mean", "std"):
        values = norm[k] if isinstance(norm[k], list) else [norm[k]]
        if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise UserInputError(f"preprocessing: normalization {k} must be finite numbers, got {norm[k]!r}")
        if len(values) == 1:
            values = values * n_ch
        if len(values) != n_ch:
            raise UserInputError(f"preprocessing: normalization has {len(values)} {k} values for {n_ch} channels")
        out[k] = [float(v) for v in values]
    if any(s <= 0 for s in out["std"]):
        raise UserInputError(f"preprocessing: normalization std must be > 0, got {out['std']}")
    return out
