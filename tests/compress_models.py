"""Small torch networks with the channel dependencies structured pruning must follow, exported to ONNX.

- ``resnet``: Conv-BN-ReLU stem, two residual blocks (identity and 1x1-projection shortcuts: the Adds
  couple channels), a depthwise-separable block, a squeeze-excitation gate (Mul), global pooling,
  Flatten → Linear;
- ``concat``: an inception-style block (three branches and the block input concatenated on
  channels), a second concat (with the raw input image: a channel that cannot be pruned) feeding
  MaxPool → Flatten → Linear, and a Linear → Linear head.

Inputs are digits-shaped [N, 1, 8, 8] images; the output is ``logits`` [N, 10].
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np


def _nn():
    import torch

    return torch, torch.nn


def build_resnet():
    torch, nn = _nn()

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                                      nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
            self.short = (nn.Identity() if cin == cout and stride == 1 else
                          nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

        def forward(self, x):
            return torch.relu(self.body(x) + self.short(x))

    class SqueezeExcite(nn.Module):
        def __init__(self, c, r=4):
            super().__init__()
            self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, c // r, 1), nn.ReLU(),
                                      nn.Conv2d(c // r, c, 1), nn.Sigmoid())

        def forward(self, x):
            return x * self.gate(x)

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
            self.block1 = Block(16, 16, 1)
            self.block2 = Block(16, 32, 2)
            self.depthwise = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False),
                                           nn.BatchNorm2d(32), nn.ReLU6(),
                                           nn.Conv2d(32, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
            self.se = SqueezeExcite(32)
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

        def forward(self, x):
            return self.head(self.se(self.depthwise(self.block2(self.block1(self.stem(x))))))

    return ResNet()


def build_concat():
    torch, nn = _nn()

    class Inception(nn.Module):
        def __init__(self, cin):
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(cin, 8, 1), nn.ReLU())
            self.b = nn.Sequential(nn.Conv2d(cin, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU())
            self.c = nn.Sequential(nn.Conv2d(cin, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU())

        def forward(self, x):
            return torch.cat([self.a(x), x, self.b(x), self.c(x)], dim=1)  # x itself: the stem's channels

    class ConcatNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
            self.inception = Inception(8)              # 8 + 8 + 12 + 6 = 34 channels
            self.mix = nn.Sequential(nn.Conv2d(34, 16, 1), nn.ReLU())
            self.side = nn.Sequential(nn.Conv2d(34, 8, 3, padding=1), nn.ReLU())
            self.pool = nn.MaxPool2d(2)
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(25 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10))

        def forward(self, image):
            y = self.inception(self.stem(image))
            # the raw image joins as a channel that cannot be pruned
            return self.head(self.pool(torch.cat([self.mix(y), self.side(y), image], dim=1)))

    return ConcatNet()


def randomize_batchnorm(model, seed: int = 0):
    """Give BatchNorm layers non-trivial statistics so pruning mistakes show in the outputs."""
    torch, nn = _nn()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model.eval()


def export(model, path: Path, opset: int = 17) -> Path:
    torch, _ = _nn()
    sample = torch.from_numpy(np.zeros((1, 1, 8, 8), np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (sample,), str(path), dynamo=False, input_names=["image"],
                          output_names=["logits"], opset_version=opset,
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    return path


def make(kind: str, out_dir: Path, seed: int = 0) -> Path:
    torch, _ = _nn()
    torch.manual_seed(seed)
    model = randomize_batchnorm({"resnet": build_resnet, "concat": build_concat}[kind](), seed)
    return export(model, Path(out_dir) / f"{kind}.onnx")
