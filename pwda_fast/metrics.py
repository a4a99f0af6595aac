"""Confusion matrices and IoU tables (computed with bincount on the tensors' device)."""

from __future__ import annotations

import torch

from pwda_fast.data.labels import CLASSES, IGNORE


def confusion(pred: torch.Tensor, label: torch.Tensor, num_classes: int = len(CLASSES)) -> torch.Tensor:
    """pred, label (...) int -> (K, K) int64 counts, rows = ground truth; void and out-of-range skipped."""
    valid = (label != IGNORE) & (label >= 0) & (label < num_classes)
    idx = label[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)


def iou_table(conf: torch.Tensor, class_names=CLASSES) -> dict:
    """{"miou": float, "iou": {name: float}} over classes that occur (union > 0), in percent."""
    conf = conf.double().cpu()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    iou = {name: round(100 * float(tp[i] / union[i]), 2)
           for i, name in enumerate(class_names) if union[i] > 0}
    miou = round(sum(iou.values()) / len(iou), 2) if iou else 0.0
    return {"miou": miou, "iou": iou}


def format_table(result: dict, title: str = "") -> str:
    lines = [title] if title else []
    width = max((len(n) for n in result["iou"]), default=4)
    lines += [f"  {name:<{width}}  {value:6.2f}" for name, value in result["iou"].items()]
    lines.append(f"  {'mIoU':<{width}}  {result['miou']:6.2f}")
    return "\n".join(lines)
