"""Input normalisation: the one definition of what the network sees, for every consumer.

Which one is right depends on the initial weights, not on taste:
- "caffe": BGR channel order, 0-255 values minus the per-channel mean, no division. DeepLab-v2
  ("Scale.") weights were trained on such inputs, and AdaptSegNet and MRNet feed them this way
  (MRNet train_ms.py / evaluate_cityscapes.py: IMG_MEAN, `[:, :, ::-1]`, `-= mean`).
- "imagenet": RGB / 255 minus the ImageNet mean, divided by its std, as torchvision weights expect.
- "auto" is data.normalize before the caller has looked at model.init_weights; read here it means
  "imagenet", the choice for a network trained from scratch (no weights to match).

The torch loader applies it (apply), the DALI pipeline gets the same numbers (get), pictures undo
it (undo). Both keep the mean colour at 0, so padding with 0 after normalisation pads with the mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NAMES = ("caffe", "imagenet")


@dataclass(frozen=True)
class Normalization:
    """name; bgr: the network sees BGR; mean, std: per channel in the network's channel order, in
    0-255 units (std 1 = no division)."""
    name: str
    bgr: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# The DeepLab / AdaptSegNet / MRNet mean, B, G, R.
CAFFE = Normalization("caffe", True, (104.00698793, 116.66876762, 122.67891434), (1.0, 1.0, 1.0))
# Computed in float32 as the loader always has, so "imagenet" inputs are bit-identical to before.
IMAGENET = Normalization("imagenet", False,
                         tuple((np.array([0.485, 0.456, 0.406], np.float32) * 255).tolist()),
                         tuple((np.array([0.229, 0.224, 0.225], np.float32) * 255).tolist()))


def get(name: str) -> Normalization:
    """data.normalize -> its definition; "auto" (unresolved) is "imagenet", see the module docstring."""
    if name == "auto":
        return IMAGENET
    if name not in NAMES:
        raise ValueError(f"unknown normalisation {name!r}; valid: {', '.join(NAMES)} (or auto)")
    return CAFFE if name == "caffe" else IMAGENET


def apply(rgb: np.ndarray, name: str) -> np.ndarray:
    """(..., 3) RGB values in 0-255 -> (..., 3) float32 network input, channels in the network's order."""
    n = get(name)
    x = np.asarray(rgb, np.float32)
    if n.bgr:
        x = x[..., ::-1]
    return (x - np.array(n.mean, np.float32)) / np.array(n.std, np.float32)


def undo(image: np.ndarray, name: str) -> np.ndarray:
    """(..., 3) network input (channels last) -> (..., 3) float32 RGB in 0-255 (not rounded or clipped)."""
    n = get(name)
    x = np.asarray(image, np.float32) * np.array(n.std, np.float32) + np.array(n.mean, np.float32)
    return np.ascontiguousarray(x[..., ::-1]) if n.bgr else x
