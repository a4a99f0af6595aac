"""The two discriminators of the method.

OutputDiscriminator (D): AdaptSegNet's fully-convolutional discriminator on the softmax of the
segmentation output: 4x4 stride-2 convs 64-128-256-512-1, LeakyReLU 0.2. At 512x1024 input -> 16x32.
FeatureDiscriminator (D_aux): three 1x1 convs and a 1x1 classifier with LeakyReLU on layer4 features,
at the feature resolution (65x129 at 512x1024) or, as the paper states, on the features upsampled to
the image size (computed exactly and cheaply: see FeatureDiscriminator.forward).
"""

from __future__ import annotations

import torch
from torch import nn

from pwda_fast import ops


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
    """(N, F, h, w) layer4 features -> (N, 1, h, w) domain logits, or (N, 1, *size) with `size`.

    forward(x, size) equals net(upsample(x, size)) (bilinear, align_corners=True), the paper's D_aux
    on image-size encodings, without upsampling the F = 2048 channels: the first 1x1 conv is linear
    and bilinear weights sum to 1, so conv(upsample(x)) == upsample(conv(x)); the first conv runs at
    feature size and only its `width` outputs are upsampled. At 512x1024 and width 256 that is 4.4
    GMAC at 65x129 instead of 275 GMAC at image size for the first conv. The upsampling and the leaky
    ReLU after it are one op (ops.upsample_leaky_relu: one pass forward, two backward on CUDA).
    """

    def __init__(self, in_channels: int = 2048, width: int = 256, upsample_backend: str = "auto"):
        super().__init__()
        # Backend of the image-size path's leaky_relu(upsample(.)) (ops.upsample_leaky_relu): "auto" is
        # the fused Triton kernels on CUDA, torch elsewhere; engine.build sets it from kernels.upsample.
        self.upsample_backend = upsample_backend
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, width, 1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width, width // 2, 1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width // 2, width // 4, 1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width // 4, 1, 1))

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None or tuple(size) == tuple(x.shape[2:]):
            return self.net(x)
        first = ops.upsample_leaky_relu(self.net[0](x), size, slope=self.net[1].negative_slope,
                                        backend=self.upsample_backend)
        return self.net[2:](first)
