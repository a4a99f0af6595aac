"""The two discriminators of the method.

OutputDiscriminator (D): AdaptSegNet's fully-convolutional discriminator on the softmax of the
segmentation output: 4x4 stride-2 convs 64-128-256-512-1, LeakyReLU 0.2. At 512x1024 input -> 16x32.
FeatureDiscriminator (D_aux): three 1x1 convs and a 1x1 classifier with LeakyReLU on layer4 features;
it keeps the feature resolution (65x129 at 512x1024).
"""

from __future__ import annotations

import torch
from torch import nn


class OutputDiscriminator(nn.Module):
    """(N, K, H, W) class probabilities -> (N, 1, H/32, W/32) domain logits."""

    def __init__(self, num_classes: int = 19, width: int = 64):
        super().__init__()
        chans = [num_classes, width, width * 2, width * 4, width * 8]
        layers = []
        for cin, cout in zip(chans, chans[1:]):
            layers += [nn.Conv2d(cin, cout, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        layers.append(nn.Conv2d(chans[-1], 1, 4, stride=2, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class FeatureDiscriminator(nn.Module):
    """(N, F, h, w) layer4 features -> (N, 1, h, w) domain logits."""

    def __init__(self, in_channels: int = 2048, width: int = 1024):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, width, 1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width, width // 2, 1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width // 2, width // 4, 1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width // 4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
