"""Target-domain evaluation: per-class IoU and mIoU of a generator, a checkpoint or saved predictions.

    python -m pwda_fast.evaluate --checkpoint runs/toy/ckpt_00001000.pt [--protocol mrnet] [--amp none]
                                 [--json FILE]
    python -m pwda_fast.evaluate --checkpoint FILE --dataset cityscapes --root DIR [--json FILE]
    python -m pwda_fast.evaluate --checkpoint FILE [...] --save-predictions OUT [--format labelid]
    python -m pwda_fast.evaluate --predictions DIR --root DIR [--format ...] [--source synthia] [--json FILE]

Scores are over the 19 Cityscapes classes at the labels' full resolution (2048x1024 for Cityscapes
val). For SYNTHIA-trained models (the checkpoint's data.source, or --source synthia) the 16- and
13-class protocols are added as miou16 / miou13, averaged from the same 19-class confusion.
A checkpoint's predictions come from one of two test protocols (--protocol, default the
checkpoint's train.eval_protocol): "single", the main head's argmax at the val size, or "mrnet",
MRNet's fusion of both heads over two scales and flips (fused_probabilities); the result's
"protocol" names it. Its forward passes run in the precision of its own evaluations (--amp, default
the checkpoint's train.amp), so a finished run scores what it recorded in final.json and best.json.
--save-predictions OUT also writes the prediction that was scored, at the label resolution, as one
PNG per val image: OUT/<image folder>/<image stem>.png, for Cityscapes val
OUT/<city>/<city>_<seq>_<frame>_leftImg8bit.png, the names the official evaluation
(cityscapesscripts' evalPixelLevelSemanticLabeling, CITYSCAPES_RESULTS=OUT) and the benchmark
server look for. --format: "trainid" (8-bit, 0..18), "labelid" (8-bit Cityscapes label ids, 7..33:
what the official evaluation and the test-set server read) or "color" (RGB, Cityscapes palette).
--predictions DIR scores such PNGs, read in --format, found for each val image as
<image stem>.png (any image extension: a .jpg image's prediction is a .png) in DIR or
DIR/<image folder>/. A pixel that names no evaluated class (trainId 255, a labelId such as 0 or 4,
black) counts as wrong, as the official evaluation counts it.
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
from pwda_fast.adapt import AMP_DTYPES, autocast
from pwda_fast.data import build_val, open_split
from pwda_fast.data.labels import (
    CITYSCAPES_ID_TO_TRAIN,
    CITYSCAPES_LABELS,
    CLASSES,
    IGNORE,
    PALETTE,
    TRAIN_TO_CITYSCAPES_ID,
    colorize,
)
from pwda_fast.data.loader import SegmentationDataset, val_loader
from pwda_fast.data.validate import describe
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


FORMATS = ("trainid", "labelid", "color")
# Colour -> trainId, with the 24-bit code r << 16 | g << 8 | b as key; black (colorize's void) names no class.
_COLOUR_TO_TRAIN = {(int(r) << 16) | (int(g) << 8) | int(b): k for k, (r, g, b) in enumerate(PALETTE)}
_COLOUR_TO_TRAIN[0] = IGNORE
# The largest Cityscapes labelId (33, bicycle); ids 0..6, 9, 10, ... name no evaluated class.
MAX_LABEL_ID = max(i for _, i, _ in CITYSCAPES_LABELS)


def _format_error(fmt: str) -> ValueError:
    return ValueError(f"unknown prediction format {fmt!r}; valid: {', '.join(FORMATS)}")


def prediction_name(image: Path) -> str:
    """The file name of an image's prediction: its stem with .png, whatever the image's extension
    (predictions must be lossless); Cityscapes X_leftImg8bit.png or .jpg -> X_leftImg8bit.png."""
    return f"{image.stem}.png"


def encode(train_ids: np.ndarray, fmt: str) -> Image.Image:
    """(H, W) uint8 trainIds 0..18 -> the prediction image in `fmt` (one of FORMATS)."""
    if fmt == "trainid":
        return Image.fromarray(train_ids, "L")
    if fmt == "labelid":
        return Image.fromarray(TRAIN_TO_CITYSCAPES_ID[train_ids], "L")
    if fmt == "color":
        return Image.fromarray(colorize(train_ids), "RGB")
    raise _format_error(fmt)


class PredictionWriter:
    """Writes predictions as `root`/<image folder>/prediction_name(image) in `fmt`, counting them.

    For Cityscapes val that is root/<city>/<city>_<seq>_<frame>_leftImg8bit.png: the official
    evalPixelLevelSemanticLabeling finds a ground truth's prediction as the one file under its results
    folder matching <city>_<seq>_<frame>*.png, so the tree holds nothing else of that pattern.
    """

    def __init__(self, root: str | Path, fmt: str = "trainid"):
        if fmt not in FORMATS:
            raise _format_error(fmt)
        self.root, self.fmt, self.count = Path(root), fmt, 0

    def write(self, image: Path, train_ids: np.ndarray) -> Path:
        """image: the val image's path; train_ids (H, W) uint8 at the label resolution."""
        path = self.root / image.parent.name / prediction_name(image)
        path.parent.mkdir(parents=True, exist_ok=True)
        encode(train_ids, self.fmt).save(path)
        self.count += 1
        return path


def _image_paths(dataset) -> list[Path]:
    """The image path of each index a val batch's "index" can hold (a Subset's are its base's)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return [Path(image) for image, _ in dataset.pairs]


@torch.no_grad()
def evaluate_model(g: torch.nn.Module, dataset, device: torch.device, amp: str = "none",
                   progress: bool = False, protocol: str = "single",
                   writer: PredictionWriter | None = None) -> dict:
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


def _find_prediction(pred_dir: Path, image: Path) -> Path | None:
    """DIR/prediction_name(image), else DIR/<image folder>/prediction_name(image), else None."""
    name = prediction_name(image)
    for candidate in (pred_dir / name, pred_dir / image.parent.name / name):
        if candidate.is_file():
            return candidate
    return None


def read_prediction(path: Path, shape: tuple[int, int], fmt: str = "trainid") -> np.ndarray:
    """A saved prediction in `fmt` -> (H, W) uint8 trainIds, 255 where it names no evaluated class;
    errors say how to fix the file."""
    with Image.open(path) as img:
        mode, pred = img.mode, np.asarray(img)
    if mode not in (("RGB",) if fmt == "color" else ("L", "P")):
        kind = "RGB PNGs" if fmt == "color" else "8-bit PNGs (mode L or P)"
        raise ValueError(f"{path}: {fmt} predictions must be {kind}, got mode {mode}; is --format right?")
    if pred.shape[:2] != shape:
        raise ValueError(f"{path}: prediction is {pred.shape[1]}x{pred.shape[0]} but its label is "
                         f"{shape[1]}x{shape[0]}; upsample predictions to the label resolution")
    if fmt == "color":
        return _from_colours(pred, path)
    if fmt == "labelid":
        if pred.max(initial=0) > MAX_LABEL_ID:
            raise ValueError(f"{path}: holds value {int(pred.max())}, but Cityscapes labelIds are "
                             f"0..{MAX_LABEL_ID}; is --format right?")
        return CITYSCAPES_ID_TO_TRAIN[pred]
    bad = pred[(pred >= len(CLASSES)) & (pred != IGNORE)]
    if bad.size:
        raise ValueError(f"{path}: holds value {int(bad.max())}, but trainId predictions are "
                         f"0..{len(CLASSES) - 1} (or {IGNORE}, no class); for labelIds or colour images "
                         f"pass --format labelid or --format color")
    return pred


def _from_colours(rgb: np.ndarray, path: Path) -> np.ndarray:
    """(H, W, 3) uint8 Cityscapes-palette colours -> (H, W) uint8 trainIds (black: 255)."""
    code = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    colours, inverse = np.unique(code, return_inverse=True)
    unknown = [c for c in colours.tolist() if c not in _COLOUR_TO_TRAIN]
    if unknown:
        c = unknown[0]
        raise ValueError(f"{path}: holds colour {(c >> 16, (c >> 8) & 255, c & 255)}, which is no Cityscapes "
                         f"class colour ({len(unknown)} such colours); colour predictions must use the "
                         f"palette exactly (no resampling blur, no JPEG)")
    lut = np.array([_COLOUR_TO_TRAIN[c] for c in colours.tolist()], np.uint8)
    return lut[inverse.reshape(code.shape)]


def score_predictions(pred_dir: str | Path, root: str | Path, device: torch.device,
                      progress: bool = False, fmt: str = "trainid") -> dict:
    """Saved prediction PNGs in `fmt` vs Cityscapes val labels (gtFine labelIds, or a prepared tree)
    -> iou table."""
    if fmt not in FORMATS:
        raise _format_error(fmt)
    pred_dir = Path(pred_dir)
    val = open_split("cityscapes", str(root), "val")
    found = [(_find_prediction(pred_dir, image), label) for image, label in val.pairs]
    missing = [{"image": str(image), "problem": f"no {prediction_name(image)} in {pred_dir} or "
                                                f"{pred_dir}/{image.parent.name}/"}
               for (image, _), (pred, _) in zip(val.pairs, found) if pred is None]
    if missing:
        raise ValueError(f"{len(missing)} of {len(found)} val images have no prediction:\n"
                         f"{describe(missing)}")
    # A pixel predicted as no class goes to an extra column K: a miss in its label's row, as the
    # official evaluation counts it; no label is K, so its row stays empty and iou_table skips it.
    k = len(CLASSES)
    conf = torch.zeros(k + 1, k + 1, dtype=torch.int64, device=device)
    for pred_path, label_path in tqdm(found, disable=not progress, desc="score", leave=False):
        label = np.asarray(val.label_reader(label_path))
        pred = read_prediction(pred_path, label.shape, fmt)
        pred = np.where(pred == IGNORE, k, pred)
        conf += metrics.confusion(torch.tensor(pred, device=device), torch.tensor(label, device=device),
                                  k + 1)
    return metrics.iou_table(conf)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pwda-evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", help="a ckpt_*.pt or best.pt written by pwda_fast.train")
    what.add_argument("--predictions", help="a folder of prediction PNGs (in --format) named like the "
                                            "val images, as --save-predictions writes them")
    parser.add_argument("--dataset", choices=("cityscapes",),
                        help="evaluate on this dataset at --root instead of the checkpoint's target")
    parser.add_argument("--root", help="the Cityscapes root (leftImg8bit/, gtFine/)")
    parser.add_argument("--source", choices=("gta5", "synthia", "toy"),
                        help="the model's source domain (default: the checkpoint's); synthia adds miou16/13")
    parser.add_argument("--protocol", choices=PROTOCOLS,
                        help="how a checkpoint is scored: single (main head, one scale) or mrnet "
                             "(fused heads, scales 1 and 1.25, flips); default: its train.eval_protocol")
    parser.add_argument("--amp", choices=tuple(AMP_DTYPES),
                        help="autocast precision of a checkpoint's forward passes: none (fp32), bf16 or "
                             "fp16; default: its train.amp, the precision its own evaluations ran in")
    parser.add_argument("--save-predictions", metavar="DIR",
                        help="with --checkpoint: also write each scored prediction (label resolution) "
                             "to DIR/<city>/<image stem>.png, as the Cityscapes benchmark names them")
    parser.add_argument("--format", choices=FORMATS,
                        help="prediction PNGs written by --save-predictions or read by --predictions: "
                             "trainid (0..18), labelid (Cityscapes label ids, what the official "
                             "evaluation and the benchmark server read) or color (Cityscapes palette); "
                             "default trainid")
    parser.add_argument("--json", help="also write {miou, iou[, protocol, miou16, miou13]} to this file")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: cuda when a GPU is visible, else cpu (default auto)")
    args = parser.parse_args(argv)
    if args.predictions and not args.root or args.dataset and not args.root:
        parser.error("--predictions and --dataset need --root (the Cityscapes folder)")
    if args.predictions and (args.protocol or args.amp):
        parser.error("--protocol and --amp score a --checkpoint; saved predictions are scored as they are")
    if args.predictions and args.save_predictions:
        parser.error("--save-predictions writes a --checkpoint's predictions; --predictions are saved")
    if args.format and not (args.predictions or args.save_predictions):
        parser.error("--format names the PNGs of --save-predictions or --predictions; give one of them")
    args.format = args.format or "trainid"
    writer = None
    try:
        device = distributed.choose_device(args.device)
        if args.predictions:
            result = score_predictions(args.predictions, args.root, device, progress=True, fmt=args.format)
            source = args.source
            title = f"{args.predictions} on Cityscapes val ({args.root})"
        else:
            nets, cfg = checkpoint.load_networks(args.checkpoint, device)
            if args.dataset:
                cfg.data.target, cfg.data.target_root, cfg.data.target_prepared = args.dataset, args.root, ""
            protocol, amp = args.protocol or cfg.train.eval_protocol, args.amp or cfg.train.amp
            writer = PredictionWriter(args.save_predictions, args.format) if args.save_predictions else None
            result = evaluate_model(nets.g, build_val(cfg.data), device, amp, progress=True,
                                    protocol=protocol, writer=writer)
            source = args.source or cfg.data.source
            title = (f"{args.checkpoint} on the {cfg.data.target} target val set ({protocol} protocol"
                     + (f", {amp} autocast)" if amp != "none" else ")"))
    except (RuntimeError, OSError, ValueError) as e:  # OSError: unreadable inputs, an unwritable DIR
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = metrics.with_protocols(result, source)
    print(metrics.format_result(result, title))
    if writer:
        print(f"wrote {writer.count} {writer.fmt} prediction PNGs (the ones scored above) to "
              f"{writer.root}/<image folder>/")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
