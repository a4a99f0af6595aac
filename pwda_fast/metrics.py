"""Confusion matrices and IoU tables (computed with bincount on the tensors' device)."""

from __future__ import annotations

import torch

from pwda_fast.data.labels import CLASSES, IGNORE, SYNTHIA_13, SYNTHIA_16


def confusion(pred: torch.Tensor, label: torch.Tensor, num_classes: int = len(CLASSES)) -> torch.Tensor:
    """pred, label (...) int -> (K, K) int64 counts, rows = ground truth; void and out-of-range skipped."""
    valid = (label != IGNORE) & (label >= 0) & (label < num_classes)
    idx = label[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)


def iou_table(conf: torch.Tensor, class_names=CLASSES) -> dict:
    """{"miou": float, "iou": {name: float}} over classes that occur (union > 0), in percent.

    Full precision: rounding is for display only (format_table), so the mIoU is the mean of the
    exact IoUs, not of rounded ones.
    """
    conf = conf.double().cpu()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    iou = {name: 100 * float(tp[i] / union[i]) for i, name in enumerate(class_names) if union[i] > 0}
    miou = sum(iou.values()) / len(iou) if iou else 0.0
    return {"miou": miou, "iou": iou}


def format_table(result: dict, title: str = "") -> str:
    lines = [title] if title else []
    width = max((len(n) for n in result["iou"]), default=4)
    lines += [f"  {name:<{width}}  {value:6.2f}" for name, value in result["iou"].items()]
    lines.append(f"  {'mIoU':<{width}}  {result['miou']:6.2f}")
    return "\n".join(lines)


def format_result(result: dict, title: str = "") -> str:
    """The per-class table, then mIoU16 / mIoU13 where the result has them."""
    lines = [format_table(result, title)]
    width = max((len(n) for n in result["iou"]), default=4)
    lines += [f"  {label:<{width}}  {result[key]:6.2f}"
              for key, label in (("miou16", "mIoU16"), ("miou13", "mIoU13")) if key in result]
    return "\n".join(lines)


# The headline numbers of a result: the 19-class mIoU and, for SYNTHIA sources, the 16- and 13-class ones.
SCORES = ("miou", "miou16", "miou13")


def with_protocols(result: dict, source: str) -> dict:
    """Add miou16 and miou13 (the SYNTHIA protocols) to an iou_table result when source is synthia.

    Both average the 19-class IoUs of their classes, as AdaptSegNet and ADVENT report them; classes
    absent from the ground truth are left out, as in the 19-class mIoU.
    """
    if source != "synthia":
        return result
    out = dict(result)
    for key, classes in (("miou16", SYNTHIA_16), ("miou13", SYNTHIA_13)):
        values = [result["iou"][c] for c in classes if c in result["iou"]]
        out[key] = sum(values) / len(values) if values else 0.0
    return out
