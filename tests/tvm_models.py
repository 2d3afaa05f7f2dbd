"""Models for the TVM target tests and benchmark, built in torch and exported with torch.onnx.export
(dynamic batch, as real exports have): a MobileNet-style CNN, an LSTM sensor model, and a model
whose export carries ``Shape`` arithmetic and an ``If`` on the input length.

Weights are seeded, not trained: these models check that compilation computes what ONNX Runtime
computes, which does not depend on what the weights learned.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np


def _torch():
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(2)
    return torch


def mobilenet_style():
    """Depthwise-separable blocks with hardswish and squeeze-and-excitation, 1×32×32 input."""
    nn = _torch().nn

    class SqueezeExcite(nn.Module):
        def __init__(self, ch: int):
            super().__init__()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc1, self.fc2 = nn.Conv2d(ch, ch // 4, 1), nn.Conv2d(ch // 4, ch, 1)

        def forward(self, x):
            s = nn.functional.relu(self.fc1(self.pool(x)))
            return x * nn.functional.hardsigmoid(self.fc2(s))

    def block(cin: int, cout: int, stride: int):
        return nn.Sequential(
            nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.Hardswish(),
            SqueezeExcite(cin),
            nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.Hardswish(),
        )

    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish(),
        block(16, 24, 2), block(24, 32, 2), block(32, 48, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, 10),
    )
    return model.eval(), (1, 1, 32, 32)


def lstm_sensor():
    """Two stacked LSTM layers over a 3-axis accelerometer window of 32 steps, then a classifier."""
    nn = _torch().nn

    class SensorLSTM(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(3, 32, num_layers=2, batch_first=True)
            self.head = nn.Linear(32, 6)

        def forward(self, x):
            out, _ = self.lstm(x)
            return self.head(out[:, -1])

    return SensorLSTM().eval(), (1, 32, 3)


def branchy_sensor():
    """A 1-D CNN whose forward branches on the window length (scripted, so the export keeps an ``If``
    and the ``Shape`` arithmetic feeding it) and reshapes with a size computed from the input."""
    torch = _torch()
    nn = torch.nn

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(3, 8, 5, padding=2)
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            y = torch.relu(self.conv(x))
            if x.size(-1) > 64:  # noqa: SIM108 - a statement, so the scripted export keeps an If node
                y = nn.functional.max_pool1d(y, 2)
            else:
                y = y * 0.5
            return self.head(y.mean(-1).reshape(x.size(0), -1))

    return torch.jit.script(Branchy().eval()), (1, 3, 128)


MODELS = {"mobilenet": mobilenet_style, "lstm": lstm_sensor, "branchy": branchy_sensor}


def export(kind: str, path: Path, dynamic_length: bool = False) -> tuple[Path, str, tuple[int, ...]]:
    """Export model ``kind`` to ``path`` with a dynamic batch dim; returns (path, input name, shape)."""
    torch = _torch()
    model, shape = MODELS[kind]()
    axes = {0: "batch", len(shape) - 1: "length"} if dynamic_length else {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(*shape),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": axes, "y": {0: "batch"}})
    return path, "x", shape


def sample_inputs(shape: tuple[int, ...], n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *shape[1:])).astype(np.float32)
