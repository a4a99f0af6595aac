"""DeepLab-v2 generator with multi-level heads (AdaptSegNet's segmentation network).

The dilated ResNet of models/backbone.py with ASPP classifiers (3x3 convs at dilations 6/12/18/24,
all four summed) on layer3 (aux) and layer4 (main).
"""

from __future__ import annotations

import torch
from torch import nn

from pwda_fast.models.backbone import DilatedResNet


class ASPPClassifier(nn.Module):
    """Sum of 3x3 convs at dilations 6/12/18/24 (all four: AdaptSegNet returns after the first two)."""

    def __init__(self, in_channels: int, num_classes: int, dilations=(6, 12, 18, 24)):
        super().__init__()
        self.conv2d_list = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=d, dilation=d, bias=True) for d in dilations)
        for conv in self.conv2d_list:
            nn.init.normal_(conv.weight, 0.0, 0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2d_list[0](x)
        for conv in self.conv2d_list[1:]:
            out = out + conv(x)
        return out


class DeepLabV2(DilatedResNet):
    """x (N, 3, H, W) -> (aux (N, K, h, w), main (N, K, h, w), feat (N, 32*width, h, w)).

    At 512x1024 input the heads are 65x129 (ceil-mode max-pool, output stride 8).
    `feat` is layer4's output, the input of the feature-space discriminator D_aux.
    bn and stride_on: see DilatedResNet.
    """

    def __init__(self, num_classes: int = 19, depth: int = 101, width: int = 64, bn: str = "frozen",
                 stride_on: str = "1x1"):
        super().__init__(depth, width, bn, stride_on)
        self.aux_head = ASPPClassifier(self.layer3_channels, num_classes)
        self.main_head = ASPPClassifier(self.feat_channels, num_classes)
        self.init_backbone()

    def forward(self, x: torch.Tensor):
        x3, x4 = self.features(x)
        return self.aux_head(x3), self.main_head(x4), x4
