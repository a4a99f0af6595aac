"""MRNet's own output-space adversary (adapt.adversary = "mrnet"): two multi-scale LSGAN discriminators.

Written from layumi/Seg-Uncertainty, model/ms_discriminator.py (`MsImageDis`, the defaults its
__init__ hard-codes: lsgan, 3 scales, dim 32, n_layer 2, 4 residual blocks, LeakyReLU 0.2, no norm)
and trainer_ms.py (`AD_Trainer`: D1 on the aux head, D2 on the main head, both re-initialised with
`weights_init('gaussian')`). Its losses (`calc_gen_loss`, `calc_dis_loss`) are reference.lsgan_*.

What the code does, where it differs from what its names suggest:
- `Conv2dBlock` builds `nn.Conv2d(..., padding=1)` whatever padding and pad_type it is given (the
  reflection-pad lines are commented out): every 3x3 conv is zero-padded by 1.
- `weights_init('gaussian')` draws every nn.Conv2d weight from N(0, 0.02) and zeroes its bias
  (`Conv2dBlock` itself has no `weight`, so only the convs inside it match).

Shapes: (N, K, H, W) class probabilities -> a list of 3 maps, scale s of shape (N, 1, H_s, W_s) with
H_0 = ceil(H / 8) (three stride-2 convs) and each further scale seeing the input average-pooled once
more (3x3, stride 2, padding 1, padding not counted) -- at 512x1024: 64x128, 32x64, 16x32.
"""

from __future__ import annotations

import torch
from torch import nn

SLOPE = 0.2  # Conv2dBlock's 'lrelu'
STRIDES = (1, 2, 4, 8)  # model.ms_disc_stride
INIT_STD = 0.02  # weights_init('gaussian')


def _conv3x3(cin: int, cout: int, stride: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, padding=1), nn.LeakyReLU(SLOPE, inplace=True))


class ResidualBlock(nn.Module):
    """x + conv(lrelu(conv(x))): MsImageDis' ResBlock ('basic'): two 3x3 convs, the second without
    activation, added to the input with no activation after the sum. (N, C, h, w) -> same."""

    def __init__(self, dim: int):
        super().__init__()
        self.body = nn.Sequential(_conv3x3(dim, dim, 1), nn.Conv2d(dim, dim, 3, 1, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class MultiScaleDiscriminator(nn.Module):
    """MsImageDis: one fully convolutional net per scale, the input average-pooled between scales.

    (N, K, H, W) -> [(N, 1, H_s, W_s) for s in range(scales)] raw LSGAN scores (no sigmoid).
    Each scale's net: 3x3 convs K->w (stride 2), w->w, w->w (stride 2), w->w, w->2w (stride 2), each
    with LeakyReLU 0.2; `res_blocks` residual blocks at 2w; a 1x1 conv to one channel. `stride` 8 is
    MRNet's; 4, 2, 1 keep the first log2(stride) stride-2 convs and make the others 1x1 stride 1 (as
    OutputDiscriminator does for the paper's D), so scale 0's field shrinks from 155 pixels (stride 8)
    to 83, 43 and 21 (stride 1: the 155 of a 512x1024 crop shrunk 8x is 19). The layer indices, and so
    the state_dict keys, are the same for every stride.
    """

    def __init__(self, num_classes: int = 19, width: int = 32, scales: int = 3, res_blocks: int = 4,
                 stride: int = 8):
        super().__init__()
        if stride not in STRIDES:
            raise ValueError(f"MultiScaleDiscriminator stride must be one of {STRIDES}; got {stride}")
        self.nets = nn.ModuleList(self._scale_net(num_classes, width, res_blocks, stride)
                                  for _ in range(scales))
        self.pool = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, INIT_STD)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _scale_net(num_classes: int, width: int, res_blocks: int, stride: int) -> nn.Sequential:
        wide = min(2 * width, 512)
        down = stride.bit_length() - 1  # the first `down` of the three stride-2 convs stay; the rest are 1x1

        def halving(cin: int, cout: int, k: int) -> nn.Module:
            if k < down:
                return _conv3x3(cin, cout, 2)
            return nn.Sequential(nn.Conv2d(cin, cout, 1), nn.LeakyReLU(SLOPE, inplace=True))

        return nn.Sequential(
            halving(num_classes, width, 0), _conv3x3(width, width, 1), halving(width, width, 1),
            _conv3x3(width, width, 1), halving(width, wide, 2),
            *(ResidualBlock(wide) for _ in range(res_blocks)),
            nn.Conv2d(wide, 1, 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        for k, net in enumerate(self.nets):
            if k:
                x = self.pool(x)
            maps.append(net(x))
        return maps


class MRNetDiscriminators(nn.Module):
    """MRNet's pair in the slot of the output-space D (Nets.d): `d1` judges the aux head's softmax,
    `d2` the main head's (trainer_ms.py D1, D2).

    forward(aux_probs, main_probs), each (N, K, H, W) -> (d1's maps, d2's maps), lists as
    MultiScaleDiscriminator gives them. One call runs both, so DDP sees one forward per stage.
    """

    def __init__(self, num_classes: int = 19, stride: int = 8, width: int = 32):
        super().__init__()
        self.d1 = MultiScaleDiscriminator(num_classes, width, stride=stride)
        self.d2 = MultiScaleDiscriminator(num_classes, width, stride=stride)

    def forward(self, aux_probs: torch.Tensor, main_probs: torch.Tensor):
        return self.d1(aux_probs), self.d2(main_probs)
