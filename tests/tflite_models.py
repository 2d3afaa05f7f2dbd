"""Real architectures built in torch and exported to ONNX the way users export them (test helper):
a MobileNet-style CNN, a ResNet-style block net, a 1-D CNN and an LSTM sensor classifier."""

from __future__ import annotations

import warnings
from pathlib import Path


def _torch():
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(2)
    return torch


def _randomize_batchnorm(model) -> None:
    """Give every BatchNorm non-trivial running statistics and affine terms (as a trained net has)."""
    torch = _torch()
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(0.2 * torch.randn(n, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
            m.weight.data.copy_(1 + 0.2 * torch.randn(n, generator=gen))
            m.bias.data.copy_(0.1 * torch.randn(n, generator=gen))


def mobilenet_style(num_classes: int = 10):
    """Stem, inverted residual blocks (1x1 expand, 3x3 depthwise, squeeze-and-excitation, 1x1 project)
    with hardswish, global pooling and a classifier, as in MobileNetV3."""
    nn = _torch().nn

    class SqueezeExcite(nn.Module):
        def __init__(self, c: int, r: int = 4):
            super().__init__()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc1 = nn.Conv2d(c, c // r, 1)
            self.fc2 = nn.Conv2d(c // r, c, 1)

        def forward(self, x):
            s = self.pool(x)
            s = nn.functional.hardsigmoid(self.fc2(nn.functional.relu(self.fc1(s))))
            return x * s

    class InvertedResidual(nn.Module):
        def __init__(self, cin: int, cout: int, expand: int, stride: int):
            super().__init__()
            mid = cin * expand
            self.use_skip = stride == 1 and cin == cout
            self.body = nn.Sequential(
                nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.Hardswish(),
                nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.Hardswish(),
                SqueezeExcite(mid),
                nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = self.body(x)
            return x + y if self.use_skip else y

    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish(),
        InvertedResidual(16, 16, 2, 1), InvertedResidual(16, 24, 3, 2), InvertedResidual(24, 24, 3, 1),
        nn.Conv2d(24, 64, 1), nn.Hardswish(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, 32), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(32, num_classes))
    _randomize_batchnorm(model)
    return model.eval()


def resnet_style(num_classes: int = 10):
    """ResNet basic blocks (conv-BN-ReLU x2 with identity or strided 1x1 shortcut), max-pool stem."""
    nn = _torch().nn

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.short = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = nn.functional.relu(self.bn1(self.conv1(x)))
            return nn.functional.relu(self.bn2(self.conv2(y)) + self.short(x))

    model = nn.Sequential(
        nn.Conv2d(3, 16, 5, 2, 2, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
        BasicBlock(16, 16, 1), BasicBlock(16, 32, 2), BasicBlock(32, 32, 1), BasicBlock(32, 64, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))
    _randomize_batchnorm(model)
    return model.eval()


def cnn1d(channels: int = 6, num_classes: int = 5):
    """A 1-D CNN over sensor windows [N, C, T]: conv-BN-ReLU, max-pool, dilated conv, GELU, average."""
    nn = _torch().nn
    model = nn.Sequential(
        nn.Conv1d(channels, 16, 5, padding=2), nn.BatchNorm1d(16), nn.ReLU(), nn.MaxPool1d(2),
        nn.Conv1d(16, 32, 3, padding=2, dilation=2), nn.GELU(), nn.AvgPool1d(2),
        nn.Conv1d(32, 32, 3, stride=2, padding=1, groups=4), nn.BatchNorm1d(32), nn.LeakyReLU(0.1),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(32, num_classes), nn.Softmax(dim=1))
    _randomize_batchnorm(model)
    return model.eval()


def lstm_classifier(channels: int = 6, hidden: int = 24, num_classes: int = 4, gru: bool = False):
    """Sensor windows [N, T, C] → 2-layer LSTM (or GRU) → last hidden state → linear classifier."""
    torch = _torch()
    nn = torch.nn

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            rnn = nn.GRU if gru else nn.LSTM
            self.rnn = rnn(channels, hidden, num_layers=2, batch_first=True)
            self.head = nn.Linear(hidden, num_classes)

        def forward(self, x):
            y, _ = self.rnn(x)
            return self.head(y[:, -1])

    return Classifier().eval()


def export(model, path: Path, sample_shape: tuple[int, ...], opset: int = 17, dynamic_batch: bool = True) -> Path:
    torch = _torch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(*sample_shape),), str(path), dynamo=False, input_names=["x"],
                          output_names=["y"], opset_version=opset,
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}} if dynamic_batch else None)
    return path
