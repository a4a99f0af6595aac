"""Confusion, IoU and the printed table on hand-checked cases."""

import pytest
import torch

from pwda_fast import metrics
from pwda_fast.data.labels import CLASSES


def test_confusion_counts_rows_by_ground_truth_and_skips_void_and_out_of_range():
    label = torch.tensor([0, 0, 1, 2, 255, 3, -1, 7])
    pred = torch.tensor([0, 1, 1, 2, 2, 0, 0, 0])
    conf = metrics.confusion(pred, label, num_classes=3)  # label 3 (== K) and -1 are out of range
    assert conf.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]


def test_iou_by_hand_with_a_single_pixel_class_and_an_absent_class():
    conf = torch.zeros(19, 19, dtype=torch.int64)
    conf[0, 0], conf[0, 1] = 3, 1  # road: 3 right, 1 called sidewalk
    conf[2, 2] = 1  # building: one pixel, right (union 1 counts)
    result = metrics.iou_table(conf)
    assert result["iou"] == {"road": 75.0, "sidewalk": 0.0, "building": 100.0}  # the rest never occurs
    assert result["miou"] == pytest.approx(175.0 / 3, abs=1e-12)  # not rounded: 58.333...
    assert metrics.iou_table(torch.zeros(19, 19, dtype=torch.int64)) == {"miou": 0.0, "iou": {}}


def test_format_table_and_synthia_protocols():
    result = {"miou": 58.33333, "iou": {"road": 75.0, "sidewalk": 0.0, "building": 100.0}}
    # names padded to the longest (8), two spaces, then 6 wide with 2 decimals
    assert metrics.format_table(result, "T") == ("T\n  road       75.00\n  sidewalk    0.00\n"
                                                 "  building  100.00\n  mIoU       58.33")
    assert metrics.format_table({"miou": 0.0, "iou": {}}) == "  mIoU    0.00"
    iou = {name: float(i) for i, name in enumerate(CLASSES)}
    full = metrics.with_protocols({"miou": 9.0, "iou": iou}, "synthia")
    assert full["miou16"] == pytest.approx(sum(iou[c] for c in metrics.SYNTHIA_16) / 16)
    assert full["miou13"] == pytest.approx(sum(iou[c] for c in metrics.SYNTHIA_13) / 13)
    assert metrics.with_protocols({"miou": 9.0, "iou": iou}, "gta5") == {"miou": 9.0, "iou": iou}
    pad = " " * (len("traffic light") - len("mIoU16") + 2)
    assert metrics.format_result(full).endswith(f"  mIoU16{pad}{full['miou16']:6.2f}\n"
                                                f"  mIoU13{pad}{full['miou13']:6.2f}")
