"""DeepLab-v2 ResNet generator with multi-level heads (AdaptSegNet's segmentation network).

Output stride 8: layer2 strides by 2 on its first 1x1 conv (Caffe style), layer3 and layer4 keep the
resolution with dilations 2 and 4. Heads are ASPP classifiers (3x3 convs at dilations 6/12/18/24,
all four summed) on layer3 (aux) and layer4 (main). Module names follow the published DeepLab-v2
weights (conv1, bn1, layer1..layer4, downsample.0/1) so initial weights load by name.
"""

from __future__ import annotations

import torch
from torch import nn

DEPTHS = {101: (3, 4, 23, 3), 50: (3, 4, 6, 3), 26: (2, 2, 2, 2), 14: (1, 1, 1, 1)}
EXPANSION = 4


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels)


class Bottleneck(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        # Caffe-style: the stride sits on the first 1x1 conv, as in the DeepLab-v2 weights.
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False)
        self.bn1 = _bn(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = _bn(planes)
        self.conv3 = nn.Conv2d(planes, planes * EXPANSION, 1, bias=False)
        self.bn3 = _bn(planes * EXPANSION)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


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


class DeepLabV2(nn.Module):
    """x (N, 3, H, W) -> (aux (N, K, h, w), main (N, K, h, w), feat (N, 32*width, h, w)), h = ceil(H/8)+1-ish.

    At 512x1024 input the heads are 65x129 (ceil-mode max-pool, stride on the 1x1 conv).
    `feat` is layer4's output, the input of the feature-space discriminator D_aux.
    """

    def __init__(self, num_classes: int = 19, depth: int = 101, width: int = 64, bn: str = "frozen"):
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"model.depth must be one of {sorted(DEPTHS)}; got {depth}")
        blocks = DEPTHS[depth]
        self.bn_mode = bn
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = _bn(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.layer1 = self._make_layer(width, blocks[0])
        self.layer2 = self._make_layer(width * 2, blocks[1], stride=2)
        self.layer3 = self._make_layer(width * 4, blocks[2], dilation=2)
        self.layer4 = self._make_layer(width * 8, blocks[3], dilation=4)
        self.feat_channels = width * 8 * EXPANSION
        self.aux_head = ASPPClassifier(width * 4 * EXPANSION, num_classes)
        self.main_head = ASPPClassifier(self.feat_channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m.bias is None:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if bn == "frozen":
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.requires_grad_(False)
                    m.bias.requires_grad_(False)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * EXPANSION or dilation in (2, 4):
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * EXPANSION, 1, stride=stride, bias=False),
                _bn(planes * EXPANSION))
        layers = [Bottleneck(self.inplanes, planes, stride, dilation, downsample)]
        self.inplanes = planes * EXPANSION
        layers += [Bottleneck(self.inplanes, planes, dilation=dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.bn_mode == "frozen":
            # A pretrained init with batch 1-2 crops: BN statistics stay those of the init.
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        x3 = self.layer3(x)
        x4 = self.layer4(x3)
        return self.aux_head(x3), self.main_head(x4), x4

    def param_groups(self, lr: float, head_lr_mult: float) -> list[dict]:
        """Backbone at lr, both heads at head_lr_mult * lr (DeepLab's 10x classifier rate)."""
        heads = [p for m in (self.aux_head, self.main_head) for p in m.parameters()]
        head_ids = {id(p) for p in heads}
        backbone = [p for p in self.parameters() if p.requires_grad and id(p) not in head_ids]
        return [{"params": backbone, "lr": lr, "lr_mult": 1.0},
                {"params": heads, "lr": lr * head_lr_mult, "lr_mult": head_lr_mult}]
