"""Target-domain evaluation: per-class IoU and mIoU of a generator, a checkpoint or saved predictions.

    python -m pwda_fast.evaluate --checkpoint runs/toy/ckpt_00001000.pt [--protocol mrnet] [--json FILE]
    python -m pwda_fast.evaluate --checkpoint FILE --dataset cityscapes --root DIR [--json FILE]
    python -m pwda_fast.evaluate --predictions DIR --root DIR [--source synthia] [--json FILE]

Scores are over the 19 Cityscapes classes at the labels' full resolution (2048x1024 for Cityscapes
val). For SYNTHIA-trained models (the checkpoint's data.source, or --source synthia) the 16- and
13-class protocols are added as miou16 / miou13, averaged from the same 19-class confusion.
A checkpoint's predictions come from one of two test protocols (--protocol, default the
checkpoint's train.eval_protocol): "single", the main head's argmax at the val size, or "mrnet",
MRNet's fusion of both heads over two scales and flips (fused_probabilities); the result's
"protocol" names it.
Saved predictions are 8-bit trainId PNGs named like the val images (<city>_<seq>_<frame>_leftImg8bit.png),
in DIR or in DIR/<city>/.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Subset
from tqdm import tqdm

from pwda_fast import checkpoint, distributed, metrics
from pwda_fast.data import build_val, open_split
from pwda_fast.data.labels import CLASSES
from pwda_fast.data.loader import SegmentationDataset, val_loader
from pwda_fast.data.validate import describe
from pwda_fast.reference import upsample_to


@torch.no_grad()
def predict(g: torch.nn.Module, image: torch.Tensor, size, amp: str = "none") -> torch.Tensor:
    """image (N, 3, H, W) -> main-head logits (N, K, *size), bilinear align_corners=True, fp32."""
    with torch.autocast(image.device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
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
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
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


@torch.no_grad()
def evaluate_model(g: torch.nn.Module, dataset, device: torch.device, amp: str = "none",
                   progress: bool = False, protocol: str = "single") -> dict:
    """Confusion over the whole dataset (labels at their stored resolution) -> iou table with
    "protocol": "single" (main head, argmax at the dataset's size) or "mrnet" (fused_probabilities
    over the dataset at MRNET_SCALES, each scale read from the image files)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
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
        conf += metrics.confusion(scores.argmax(1), label, k)
    g.train(was_training)
    return {**metrics.iou_table(conf), "protocol": protocol}


def _find_prediction(pred_dir: Path, image: Path) -> Path | None:
    for candidate in (pred_dir / image.name, pred_dir / image.parent.name / image.name):
        if candidate.is_file():
            return candidate
    return None


def read_prediction(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """A saved prediction -> (H, W) uint8 trainIds; errors say how to fix the file."""
    img = Image.open(path)
    if img.mode not in ("L", "P"):
        raise ValueError(f"{path}: predictions must be 8-bit trainId PNGs (mode L or P), "
                         f"got mode {img.mode}")
    pred = np.asarray(img)
    if pred.shape != shape:
        raise ValueError(f"{path}: prediction is {pred.shape[1]}x{pred.shape[0]} but its label is "
                         f"{shape[1]}x{shape[0]}; upsample predictions to the label resolution")
    if pred.max(initial=0) >= len(CLASSES):
        raise ValueError(f"{path}: holds value {int(pred.max())}, but predictions must be trainIds "
                         f"0..{len(CLASSES) - 1} (labelIds or colour images must be converted back)")
    return pred


def score_predictions(pred_dir: str | Path, root: str | Path, device: torch.device,
                      progress: bool = False) -> dict:
    """Saved trainId PNGs vs Cityscapes val labels (gtFine labelIds, or a prepared tree) -> iou table."""
    pred_dir = Path(pred_dir)
    val = open_split("cityscapes", str(root), "val")
    found = [(_find_prediction(pred_dir, image), label) for image, label in val.pairs]
    missing = [{"image": str(image), "problem": f"no {image.name} in {pred_dir} or {pred_dir}/<city>/"}
               for (image, _), (pred, _) in zip(val.pairs, found) if pred is None]
    if missing:
        raise ValueError(f"{len(missing)} of {len(found)} val images have no prediction:\n"
                         f"{describe(missing)}")
    conf = torch.zeros(len(CLASSES), len(CLASSES), dtype=torch.int64, device=device)
    for pred_path, label_path in tqdm(found, disable=not progress, desc="score", leave=False):
        label = np.asarray(val.label_reader(label_path))
        pred = read_prediction(pred_path, label.shape)
        conf += metrics.confusion(torch.tensor(pred, device=device), torch.tensor(label, device=device))
    return metrics.iou_table(conf)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pwda_fast.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", help="a ckpt_*.pt written by pwda_fast.train")
    what.add_argument("--predictions", help="a folder of trainId PNGs named like the val images")
    parser.add_argument("--dataset", choices=("cityscapes",),
                        help="evaluate on this dataset at --root instead of the checkpoint's target")
    parser.add_argument("--root", help="the Cityscapes root (leftImg8bit/, gtFine/)")
    parser.add_argument("--source", choices=("gta5", "synthia", "toy"),
                        help="the model's source domain (default: the checkpoint's); synthia adds miou16/13")
    parser.add_argument("--protocol", choices=PROTOCOLS,
                        help="how a checkpoint is scored: single (main head, one scale) or mrnet "
                             "(fused heads, scales 1 and 1.25, flips); default: its train.eval_protocol")
    parser.add_argument("--json", help="also write {miou, iou[, protocol, miou16, miou13]} to this file")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args(argv)
    if args.predictions and not args.root or args.dataset and not args.root:
        parser.error("--predictions and --dataset need --root (the Cityscapes folder)")
    if args.predictions and args.protocol:
        parser.error("--protocol scores a --checkpoint; saved predictions are scored as they are")
    try:
        device = distributed.choose_device(args.device)
        if args.predictions:
            result = score_predictions(args.predictions, args.root, device, progress=True)
            source = args.source
            title = f"{args.predictions} on Cityscapes val ({args.root})"
        else:
            nets, cfg = checkpoint.load_networks(args.checkpoint, device)
            if args.dataset:
                cfg.data.target, cfg.data.target_root, cfg.data.target_prepared = args.dataset, args.root, ""
            protocol = args.protocol or cfg.train.eval_protocol
            result = evaluate_model(nets.g, build_val(cfg.data), device, progress=True, protocol=protocol)
            source = args.source or cfg.data.source
            title = f"{args.checkpoint} on the {cfg.data.target} target val set ({protocol} protocol)"
    except (RuntimeError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = metrics.with_protocols(result, source)
    print(metrics.format_result(result, title))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
