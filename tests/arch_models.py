"""Real architectures built in torch and exported with ``torch.onnx.export`` (dynamic batch), for
target tests: a MobileNet-style CNN (depthwise + pointwise convolutions, hardswish, squeeze-and-
excitation blocks), an LSTM sensor classifier, a GRU sensor model, and a classifier whose export
keeps ``Shape`` arithmetic and an ``If`` subgraph until its input shape is fixed.

Weights are seeded random (with BatchNorm statistics set to non-trivial values): conversion and
parity do not need trained weights, and the tests stay fast. Self-contained on purpose, so any
target's tests can share it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np


def _torch():
    import torch

    torch.manual_seed(0)
    return torch


def _randomize_batchnorm(model) -> None:
    """Eval-mode BatchNorm with identity statistics would hide layout mistakes; give it real ones."""
    torch = _torch()
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
            m.weight.data.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
            m.bias.data.copy_(torch.randn(n, generator=gen) * 0.1)


def mobilenet_style(num_classes: int = 10, width: int = 40):
    """A MobileNetV3-style classifier for 3x32x32 images (width 40: ~0.64M weights, 0.15M at width 16)."""
    nn = _torch().nn

    class SqueezeExcite(nn.Module):
        def __init__(self, channels: int, reduced: int):
            super().__init__()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.reduce = nn.Conv2d(channels, reduced, 1)
            self.expand = nn.Conv2d(reduced, channels, 1)

        def forward(self, x):
            s = self.pool(x)
            s = nn.functional.relu(self.reduce(s))
            return x * nn.functional.hardsigmoid(self.expand(s))

    class InvertedResidual(nn.Module):
        def __init__(self, cin: int, expand: int, cout: int, stride: int, se: bool):
            super().__init__()
            self.use_residual = stride == 1 and cin == cout
            layers = [nn.Conv2d(cin, expand, 1, bias=False), nn.BatchNorm2d(expand), nn.Hardswish(),
                      nn.Conv2d(expand, expand, 3, stride, 1, groups=expand, bias=False), nn.BatchNorm2d(expand),
                      nn.Hardswish()]
            if se:
                layers.append(SqueezeExcite(expand, max(8, expand // 4)))
            layers += [nn.Conv2d(expand, cout, 1, bias=False), nn.BatchNorm2d(cout)]
            self.block = nn.Sequential(*layers)

        def forward(self, x):
            y = self.block(x)
            return x + y if self.use_residual else y

    w = width
    model = nn.Sequential(
        nn.Conv2d(3, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.Hardswish(),
        InvertedResidual(w, w * 4, w, 1, se=True),
        InvertedResidual(w, w * 4, w * 2, 2, se=False),
        InvertedResidual(w * 2, w * 6, w * 2, 1, se=True),
        InvertedResidual(w * 2, w * 6, w * 4, 2, se=True),
        InvertedResidual(w * 4, w * 8, w * 4, 1, se=True),
        nn.Conv2d(w * 4, w * 16, 1, bias=False), nn.BatchNorm2d(w * 16), nn.Hardswish(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w * 16, 256), nn.Hardswish(), nn.Dropout(0.2),
        nn.Linear(256, num_classes),
    )
    _randomize_batchnorm(model)
    return model.eval()


def lstm_sensor(channels: int = 6, hidden: int = 128, classes: int = 5):
    """Two stacked LSTM layers (~0.2M weights) over a [batch, time, channels] window, classifying the
    last step."""
    nn = _torch().nn

    class LstmSensor(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(channels, hidden, num_layers=2, batch_first=True)
            self.head = nn.Linear(hidden, classes)

        def forward(self, x):
            y, _ = self.lstm(x)
            return self.head(y[:, -1])

    return LstmSensor().eval()


def gru_sensor(channels: int = 4, hidden: int = 24, bidirectional: bool = True):
    """A (bidirectional) GRU over [batch, time, channels], mean over time, then a linear layer."""
    nn = _torch().nn

    class GruSensor(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = nn.GRU(channels, hidden, batch_first=True, bidirectional=bidirectional)
            self.head = nn.Linear(hidden * (2 if bidirectional else 1), 3)

        def forward(self, x):
            y, _ = self.gru(x)
            return self.head(y.mean(dim=1))

    return GruSensor().eval()


def shape_dependent_classifier(features: int = 16, classes: int = 4):
    """An exported model that keeps ``Shape`` arithmetic and an ``If`` until its input shape is fixed.

    A scripted branch picks a path by the input's width and the crop length is computed from the
    input's shape, so ``torch.onnx.export`` (TorchScript) emits Shape/Gather/Div and an ``If`` node
    with two subgraphs. Export it with a dynamic width (``dynamic_input_dims={1: "width"}``) and
    neither folds away until ``--input-shape`` fixes the width.
    """
    torch = _torch()
    nn = torch.nn

    @torch.jit.script
    def by_width(x: torch.Tensor) -> torch.Tensor:
        if x.size(1) > 8:
            return x[:, : x.size(1) // 2] * 2.0
        return x + 1.0

    class ShapeDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(features // 2, 32)
            self.head = nn.Linear(32, classes)

        def forward(self, x):
            y = by_width(x)
            y = torch.relu(self.proj(y.reshape(x.shape[0], -1)))
            return self.head(y)

    return ShapeDependent().eval()


def export(model, path: Path, example: np.ndarray, input_name: str = "x", output_name: str = "y",
           opset: int = 17, dynamic_batch: bool = True, dynamic_input_dims: dict[int, str] | None = None) -> Path:
    """``torch.onnx.export`` (TorchScript exporter) with a dynamic batch dim (and any other dynamic
    input dims named in ``dynamic_input_dims``)."""
    torch = _torch()
    dynamic = {input_name: {0: "batch", **(dynamic_input_dims or {})}, output_name: {0: "batch"}} if dynamic_batch \
        else None
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.from_numpy(example),), str(path), dynamo=False, input_names=[input_name],
                          output_names=[output_name], opset_version=opset, dynamic_axes=dynamic)
    return Path(path)


def torch_outputs(model, x: np.ndarray) -> np.ndarray:
    torch = _torch()
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def sample(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
