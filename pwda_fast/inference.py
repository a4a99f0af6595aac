"""Inference: a generator's predictions and its target-val scores under the two test protocols.

predict() is the main head's logits at a given size; fused_probabilities() is MRNet's test-time
fusion of both heads over scales and flips; evaluate_model() scores a val set under "single" (the
main head's argmax at the val size) or "mrnet" (fused_probabilities over MRNET_SCALES, each scale
read from the image files by rescaled()) at the labels' resolution, optionally handing each scored
prediction to a writer (predictions.PredictionWriter). Forward passes run under train.amp's autocast
(precision.autocast); outputs are fp32. Training's evaluations, its pictures and `pwda-evaluate`
all predict through here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import Subset
from tqdm import tqdm

from pwda_fast import metrics
from pwda_fast.data.labels import CLASSES
from pwda_fast.data.loader import SegmentationDataset, val_loader
from pwda_fast.precision import autocast
from pwda_fast.reference import upsample_to


@torch.no_grad()
def predict(g: torch.nn.Module, image: torch.Tensor, size, amp: str = "none") -> torch.Tensor:
    """image (N, 3, H, W) -> main-head logits (N, K, *size), bilinear align_corners=True, fp32."""
    with autocast(image.device.type, amp):
        _, main, _ = g(image)
    return upsample_to(main.float(), size)


PROTOCOLS = ("single", "mrnet")
MRNET_SCALES = (1.0, 1.25)  # evaluate_cityscapes.py: 1024x512 and 1280x640 inputs (its 0.9 is unused)


@torch.no_grad()
def fused_probabilities(g: torch.nn.Module, images: Sequence[torch.Tensor], size,
                        amp: str = "none") -> torch.Tensor:
    """MRNet's test-time fusion: [(N, 3, h_s, w_s)] one input per scale -> (N, K, *size) summed
    class probabilities, fp32.

    For each input and each of (as is, mirrored): softmax(0.5 * aux + main) of the generator's two
    heads, the mirrored pass's logits mirrored back first, upsampled to `size` (bilinear,
    align_corners=True) after the softmax; the maps are summed with equal weights. This is what
    MRNet's evaluate_cityscapes.py does on Cityscapes val: inputs resized from the image files to
    1024x512 and 1280x640 (bicubic, mean-subtracted BGR), model(x) and fliplr(model(fliplr(x)))
    per scale, nn.Upsample((1024, 2048), bilinear, align_corners=True) of each softmax, argmax of
    the sum of the four maps.
    """
    total = None
    for image in images:
        for mirrored in (False, True):
            x = image.flip(-1) if mirrored else image
            with autocast(x.device.type, amp):
                aux, main, _ = g(x)
            logits = 0.5 * aux.float() + main.float()  # (N, K, h, w)
            if mirrored:
                logits = logits.flip(-1)
            probs = upsample_to(logits.softmax(1), size)
            total = probs if total is None else total.add_(probs)
    return total


def rescaled(dataset, factor: float):
    """The val set with its images resized `factor` times larger from their files (labels as they
    are, same normalisation and interpolation); a Subset keeps its indices."""
    if isinstance(dataset, Subset):
        return Subset(rescaled(dataset.dataset, factor), dataset.indices)
    if not isinstance(dataset, SegmentationDataset) or not dataset.size:
        raise ValueError(f"the mrnet protocol needs a val set resized to a fixed size (data.target_size) "
                         f"to scale it by {factor:g}; got {type(dataset).__name__} with size "
                         f"{getattr(dataset, 'size', None)}")
    w, h = dataset.size
    return dataset.at_size((int(w * factor + 0.5), int(h * factor + 0.5)))


class Writer(Protocol):
    """What evaluate_model hands each scored prediction to (predictions.PredictionWriter)."""

    def write(self, image: Path, train_ids: np.ndarray) -> Path: ...


def _image_paths(dataset) -> list[Path]:
    """The image path of each index a val batch's "index" can hold (a Subset's are its base's)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return [Path(image) for image, _ in dataset.pairs]


@torch.no_grad()
def evaluate_model(g: torch.nn.Module, dataset, device: torch.device, amp: str = "none",
                   progress: bool = False, protocol: str = "single",
                   writer: Writer | None = None) -> dict:
    """Confusion over the whole dataset (labels at their stored resolution) -> iou table with
    "protocol": "single" (main head, argmax at the dataset's size) or "mrnet" (fused_probabilities
    over the dataset at MRNET_SCALES, each scale read from the image files). A `writer` receives
    each scored (H, W) prediction, at the label resolution."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
    images = _image_paths(dataset) if writer else []
    scales = MRNET_SCALES if protocol == "mrnet" else (1.0,)
    loaders = [val_loader(dataset if s == 1.0 else rescaled(dataset, s)) for s in scales]
    was_training = g.training
    g.eval()
    k = len(CLASSES)
    conf = torch.zeros(k, k, dtype=torch.int64, device=device)
    for batches in tqdm(zip(*loaders), total=len(dataset), disable=not progress, desc="evaluate",
                        leave=False):
        label = batches[0]["label"].to(device)
        size = tuple(label.shape[1:])
        if protocol == "mrnet":
            scores = fused_probabilities(g, [b["image"].to(device) for b in batches], size, amp)
        else:
            scores = predict(g, batches[0]["image"].to(device), size, amp)
        pred = scores.argmax(1)  # (N, H, W)
        conf += metrics.confusion(pred, label, k)
        if writer:
            for index, ids in zip(batches[0]["index"].tolist(), pred.to(torch.uint8).cpu().numpy()):
                writer.write(images[index], ids)
    g.train(was_training)
    return {**metrics.iou_table(conf), "protocol": protocol}
