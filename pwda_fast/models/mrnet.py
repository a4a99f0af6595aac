"""MRNet's generator (Zheng & Yang, layumi/Seg-Uncertainty model/deeplab_multi.py), the paper's F and C.

The dilated ResNet of models/backbone.py with two MRNet classifier heads: the aux head on layer3,
the main head on concat(layer4, layer3) (layer4 first, as MRNet concatenates). Module names inside
a head (conv2d_list, bottleneck, head) are MRNet's, so its checkpoints load once layer5/layer6 are
renamed aux_head/main_head (pwda_fast.models.load_init_weights does that).
"""

from __future__ import annotations

import torch
from torch import nn

from pwda_fast.models.backbone import DilatedResNet

NORMS = ("gn", "bn")
# GroupNorm groups in MRNet's heads (its NormLayer 'gn').
GN_GROUPS = 32
# Squeeze-excitation reduction of MRNet's SEBlock: 1280 -> 80 -> 1280 at head width 256.
SE_REDUCTION = 16


def _norm(channels: int, style: str) -> nn.Module:
    if style == "bn":
        return nn.BatchNorm2d(channels)
    # min(): a toy head narrower than 32 channels gets one channel per group; the published
    # widths (256, 512) are multiples of 32, so they get MRNet's 32 groups.
    return nn.GroupNorm(min(GN_GROUPS, channels), channels)


class SEBlock(nn.Module):
    """x (N, C, h, w) -> x * sigmoid(MLP(mean over h, w)) per channel; C -> C // 16 -> C."""

    def __init__(self, channels: int, reduction: int = SE_REDUCTION):
        super().__init__()
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.se = nn.Sequential(nn.Linear(channels, channels // reduction), nn.ReLU(inplace=True),
                                nn.Linear(channels // reduction, channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.se(self.global_pool(x).flatten(1))  # (N, C)
        return x * scale[:, :, None, None]


class MRNetClassifier(nn.Module):
    """MRNet's Classifier_Module: x (N, Cin, h, w) -> logits (N, K, h, w).

    Five parallel branches (a 1x1 conv and 3x3 convs at dilation = padding 6, 12, 18, 24), each
    conv (with bias) -> norm -> ReLU to `width` channels; concatenated (5 * width); optional
    squeeze-excitation; 3x3 conv (with bias) to 2 * width -> norm, no ReLU; Dropout2d; 1x1
    classifier without bias.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 256, norm: str = "gn",
                 se: bool = True, dropout: float = 0.1, dilations=(6, 12, 18, 24)):
        super().__init__()
        branches = [nn.Conv2d(in_channels, width, 1, bias=True)]
        branches += [nn.Conv2d(in_channels, width, 3, padding=d, dilation=d, bias=True)
                     for d in dilations]
        self.conv2d_list = nn.ModuleList(
            nn.Sequential(conv, _norm(width, norm), nn.ReLU(inplace=True)) for conv in branches)
        cat_channels = width * len(branches)
        bottleneck = [nn.Conv2d(cat_channels, 2 * width, 3, padding=1, bias=True),
                      _norm(2 * width, norm)]
        self.bottleneck = nn.Sequential(*([SEBlock(cat_channels)] if se else []), *bottleneck)
        self.head = nn.Sequential(nn.Dropout2d(dropout),
                                  nn.Conv2d(2 * width, num_classes, 1, bias=False))
        # The initialisation MRNet's published code actually performs. Its init loop over
        # conv2d_list sees the Sequentials, not their convs, so the branch convs and norms keep
        # PyTorch's defaults; the SEBlock is not an nn.Linear, so its Linears keep theirs too.
        # Only the bottleneck conv (kaiming fan_in, bias 0), its norm (1, 0) and the classifier
        # (N(0, 0.001)) are set explicitly.
        bottleneck_conv, bottleneck_norm = bottleneck
        nn.init.kaiming_normal_(bottleneck_conv.weight, a=0, mode="fan_in")
        nn.init.zeros_(bottleneck_conv.bias)
        nn.init.ones_(bottleneck_norm.weight)
        nn.init.zeros_(bottleneck_norm.bias)
        nn.init.normal_(self.head[1].weight, 0.0, 0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat([branch(x) for branch in self.conv2d_list], 1)  # (N, 5 * width, h, w)
        return self.head(self.bottleneck(out))


class MRNet(DilatedResNet):
    """x (N, 3, H, W) -> (aux (N, K, h, w), main (N, K, h, w), feat (N, 32*width, h, w)).

    aux = head(layer3), main = head(concat(layer4, layer3)), feat = layer4 (the input of D_aux);
    h, w = 65, 129 at 512x1024. At depth 101, width 64, 19 classes, head width 256, GroupNorm and
    SE this has MRNet's 93,536,480 parameters. bn and stride_on: see DilatedResNet; bn governs the
    backbone only, the head norms always train.
    """

    def __init__(self, num_classes: int = 19, depth: int = 101, width: int = 64, bn: str = "stats",
                 stride_on: str = "1x1", head_width: int = 256, head_norm: str = "gn",
                 head_se: bool = True, head_dropout: float = 0.1):
        if head_norm not in NORMS:
            raise ValueError(f"model.head_norm must be one of {NORMS}; got {head_norm!r}")
        if head_norm == "gn":
            for c in (head_width, 2 * head_width):
                if c % min(GN_GROUPS, c):
                    raise ValueError(f"model.head_width = {head_width}: GroupNorm splits {c} "
                                     f"channels into {min(GN_GROUPS, c)} groups, which does not "
                                     "divide; use a multiple of 32, or 16 or less")
        if head_se and 5 * head_width // SE_REDUCTION < 1:
            raise ValueError(f"model.head_width = {head_width}: squeeze-excitation needs "
                             f"5 * head_width >= {SE_REDUCTION}; use a wider head or head_se = false")
        super().__init__(depth, width, bn, stride_on)
        head = dict(num_classes=num_classes, width=head_width, norm=head_norm, se=head_se,
                    dropout=head_dropout)
        self.aux_head = MRNetClassifier(self.layer3_channels, **head)
        self.main_head = MRNetClassifier(self.feat_channels + self.layer3_channels, **head)
        self.init_backbone()

    def forward(self, x: torch.Tensor):
        x3, x4 = self.features(x)
        return self.aux_head(x3), self.main_head(torch.cat((x4, x3), 1)), x4
