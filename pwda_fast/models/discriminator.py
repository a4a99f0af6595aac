"""The two discriminators of the method.

OutputDiscriminator (D): AdaptSegNet's fully-convolutional discriminator on the softmax of the
segmentation output: 4x4 stride-2 convs 64-128-256-512-1, LeakyReLU 0.2. At 512x1024 input -> 16x32.
With a total stride below the paper's 32 (model.disc_stride, the toy), the first log2(stride) convs
are the paper's and the rest are 1x1, so D keeps the paper's geometry at a smaller scale.
FeatureDiscriminator (D_aux): three 1x1 convs and a 1x1 classifier with LeakyReLU on layer4 features,
at the feature resolution (65x129 at 512x1024) or, as the paper states, on the features upsampled to
the image size (computed exactly and cheaply: see FeatureDiscriminator.forward).
"""

from __future__ import annotations

import torch
from torch import nn

from pwda_fast import ops

STRIDES = (1, 2, 4, 8, 16, 32)  # model.disc_stride's choices: 2 ** (stride-2 convs among the five)


class OutputDiscriminator(nn.Module):
    """(N, K, H, W) class probabilities -> (N, 1, H/stride, W/stride) domain logits.

    stride 32 (the default) is the paper's D exactly: five 4x4 stride-2 convs (padding 1). A smaller
    stride keeps the five convs and their widths; the first log2(stride) stay 4x4 stride 2 and the
    others become 1x1 (stride 1, no padding). Each cell then sees 1 + 3 * (stride - 1) input pixels,
    about 3 cells across, as the paper's 94-pixel field on its 32-pixel cells does: D at stride 4 on
    64x128 crops has the paper's 16x32 cells per crop and fields of 10 pixels (a 512x1024 crop
    shrunk 8x turns the paper's 94 into 12). The layer indices, and so the state_dict keys, are
    the same for every stride.
    """

    def __init__(self, num_classes: int = 19, width: int = 64, stride: int = 32):
        super().__init__()
        if stride not in STRIDES:
            raise ValueError(f"OutputDiscriminator stride must be one of {STRIDES}; got {stride}")
        down = stride.bit_length() - 1  # convs that halve the resolution
        chans = [num_classes, width, width * 2, width * 4, width * 8, 1]
        layers = []
        for i, (cin, cout) in enumerate(zip(chans, chans[1:])):
            conv = (nn.Conv2d(cin, cout, 4, stride=2, padding=1) if i < down else nn.Conv2d(cin, cout, 1))
            layers += [conv, nn.LeakyReLU(0.2, inplace=True)] if i < 4 else [conv]
        self.net = nn.Sequential(*layers)
        self.stride = stride

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

    def __init__(self, in_channels: int = 2048, width: int = 256, upsample: ops.FirstCall | None = None):
        super().__init__()
        # The image-size path's leaky_relu(upsample(.)) (ops.upsample_leaky_relu) as the run resolved it
        # (ops.Kernels.upsample, from kernels.upsample); None: "auto", the fused Triton kernels on CUDA,
        # torch elsewhere.
        self.upsample = upsample or ops.FirstCall("auto", ops.UPSAMPLE.what)
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, width, 1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width, width // 2, 1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width // 2, width // 4, 1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width // 4, 1, 1))

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None or tuple(size) == tuple(x.shape[2:]):
            return self.net(x)
        low = self.net[0](x)
        first = self.upsample(lambda backend: ops.upsample_leaky_relu(
            low, size, slope=self.net[1].negative_slope, backend=backend), grad_of=(low,))
        return self.net[2:](first)

