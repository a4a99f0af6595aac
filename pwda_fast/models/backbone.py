"""The dilated Caffe-style ResNet that both generators (DeepLabV2, MRNet) are built on.

Output stride 8: layer2 strides by 2, layer3 and layer4 keep the resolution with dilations 2 and 4;
the stem's max-pool rounds up (ceil_mode), so 512x1024 -> 65x129. Module names (conv1, bn1,
layer1..layer4, downsample.0/1) are those of the published DeepLab-v2 "Scale." weights and of
torchvision's resnet, so initial weights load by name. The generators subclass this and add
`aux_head` and `main_head`; everything a subclass adds counts as head in `param_groups`.
"""

from __future__ import annotations

import collections

import torch
from torch import nn

DEPTHS = {101: (3, 4, 23, 3), 50: (3, 4, 6, 3), 26: (2, 2, 2, 2), 14: (1, 1, 1, 1)}
EXPANSION = 4
BN_MODES = ("stats", "frozen", "train")
STRIDE_ON = ("1x1", "3x3")


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (dilated) -> 1x1 with a residual; the stride sits on the 1x1 or on the 3x3 conv.

    stride_on "1x1" is the Caffe / DeepLab-v2 layout (AdaptSegNet and MRNet mark it "# change"),
    "3x3" is torchvision's: the parameters have the same shapes, so only the layout of the weights
    file tells which geometry they were trained in.
    """

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None, stride_on: str = "1x1"):
        super().__init__()
        stride_1x1, stride_3x3 = (stride, 1) if stride_on == "1x1" else (1, stride)
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=stride_1x1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride_3x3, padding=dilation,
                               dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * EXPANSION, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * EXPANSION)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class DilatedResNet(nn.Module):
    """x (N, 3, H, W) -> layer3 (N, 16*width, h, w), layer4 (N, 32*width, h, w); h = 65 at H = 512.

    bn (backbone BatchNorm only; a subclass's head norms always train):
      "stats"  affine frozen, batch statistics used and running statistics updated in train mode,
               as AdaptSegNet and MRNet run it (their model stays in train() with BN affine frozen);
      "frozen" affine frozen and BN kept in eval mode: the statistics stay those of the init;
      "train"  everything trains.
    stride_on: "1x1" (Caffe / DeepLab-v2 weights) or "3x3" (torchvision weights); "auto" must be
    resolved from the weights file first (pwda_fast.models.resolve_model).
    """

    def __init__(self, depth: int = 101, width: int = 64, bn: str = "frozen",
                 stride_on: str = "1x1"):
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"model.depth must be one of {sorted(DEPTHS)}; got {depth}")
        if bn not in BN_MODES:
            raise ValueError(f"model.bn must be one of {BN_MODES}; got {bn!r}")
        if stride_on not in STRIDE_ON:
            raise ValueError(f"model.stride_on must be one of {STRIDE_ON} when the network is built; "
                             f"got {stride_on!r} (resolve 'auto' with "
                             "pwda_fast.models.resolve_model first)")
        blocks = DEPTHS[depth]
        self.bn_mode, self.stride_on = bn, stride_on
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.layer1 = self._make_layer(width, blocks[0])
        self.layer2 = self._make_layer(width * 2, blocks[1], stride=2)
        self.layer3 = self._make_layer(width * 4, blocks[2], dilation=2)
        self.layer4 = self._make_layer(width * 8, blocks[3], dilation=4)
        self.layer3_channels = width * 4 * EXPANSION
        self.feat_channels = width * 8 * EXPANSION
        if bn != "train":
            for m in self.backbone_bns():
                m.weight.requires_grad_(False)
                m.bias.requires_grad_(False)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * EXPANSION or dilation in (2, 4):
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * EXPANSION, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * EXPANSION))
        layers = [Bottleneck(self.inplanes, planes, stride, dilation, downsample, self.stride_on)]
        self.inplanes = planes * EXPANSION
        layers += [Bottleneck(self.inplanes, planes, dilation=dilation, stride_on=self.stride_on)
                   for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def backbone_modules(self) -> list[nn.Module]:
        return [self.conv1, self.bn1, self.layer1, self.layer2, self.layer3, self.layer4]

    def backbone_bns(self) -> list[nn.BatchNorm2d]:
        return [m for part in self.backbone_modules() for m in part.modules()
                if isinstance(m, nn.BatchNorm2d)]

    def init_backbone(self) -> None:
        """Kaiming (fan_out) for the bias-free backbone convs; BN keeps weight 1, bias 0.

        Only a from-scratch run (the toy) sees this: the published generators always load the
        backbone from a weights file. Subclasses call it after building their heads, so that the
        random stream, and with it a seeded DeepLabV2, stays what it was before the split.
        """
        for part in self.backbone_modules():
            for m in part.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def train(self, mode: bool = True):
        super().train(mode)
        if self.bn_mode == "frozen":
            # A pretrained init with batch 1-2 crops: BN statistics stay those of the init.
            for m in self.backbone_bns():
                m.eval()
        return self

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, 3, H, W) -> (layer3 (N, 16*width, h, w), layer4 (N, 32*width, h, w))."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x3 = self.layer3(self.layer2(self.layer1(x)))
        return x3, self.layer4(x3)

    def backbone_listing(self) -> list[nn.Parameter]:
        """The backbone's trainable tensors as MRNet's (and AdaptSegNet's) get_1x_lr_params_NOscale
        lists them: for each of conv1, bn1, layer1..4, every module in it (itself included) yields all
        its parameters, recursively, so a tensor appears once per module above it: conv1 once, a
        bottleneck conv 3 times (layer, block, conv), a downsample conv 4 times. R101 with frozen BN
        affine: 314 entries for 104 tensors."""
        return [p for part in self.backbone_modules() for m in part.modules() for p in m.parameters()
                if p.requires_grad]

    def param_groups(self, lr: float, head_lr_mult: float, repeats: bool = False) -> list[dict]:
        """Backbone parameters that train at lr, every head parameter at head_lr_mult * lr.

        DeepLab's 10x classifier rate; MRNet's optim_parameters splits the same way. repeats: the
        backbone is split by how often backbone_listing() names each tensor, one group per count with
        "repeats": count, for an optimizer that steps a group that many times (engine.RepeatingSGD).
        """
        backbone_ids = {id(p) for part in self.backbone_modules() for p in part.parameters()}
        backbone = [p for p in self.parameters() if id(p) in backbone_ids and p.requires_grad]
        heads = [p for p in self.parameters() if id(p) not in backbone_ids]
        head_group = {"params": heads, "lr": lr * head_lr_mult, "lr_mult": head_lr_mult}
        if not repeats:
            return [{"params": backbone, "lr": lr, "lr_mult": 1.0}, head_group]
        counts = collections.Counter(id(p) for p in self.backbone_listing())
        by_count: dict[int, list] = {}
        for p in backbone:  # parameters() order within each group
            by_count.setdefault(counts[id(p)], []).append(p)
        return [{"params": ps, "lr": lr, "lr_mult": 1.0, "repeats": k} for k, ps in sorted(by_count.items())
                ] + [{**head_group, "repeats": 1}]
