"""Prediction files: the PNG formats, writing a model's predictions, reading them back and scoring them.

A prediction is one PNG per val image at the label resolution, named prediction_name(image) (the
image's stem with .png) under its image folder: for Cityscapes val
<city>/<city>_<seq>_<frame>_leftImg8bit.png, what the official evaluation (cityscapesscripts'
evalPixelLevelSemanticLabeling) and the benchmark server look for. FORMATS: "trainid" (8-bit, 0..18),
"labelid" (8-bit Cityscapes label ids, 7..33) or "color" (RGB, Cityscapes palette). PredictionWriter
writes them (inference.evaluate_model hands it each scored prediction); read_prediction reads one
back as trainIds; score_predictions scores a folder of them against Cityscapes val, a pixel that
names no evaluated class counting as wrong, as the official evaluation counts it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from pwda_fast import metrics
from pwda_fast.data import open_split
from pwda_fast.data.labels import (
    CITYSCAPES_ID_TO_TRAIN,
    CITYSCAPES_LABELS,
    CLASSES,
    IGNORE,
    PALETTE,
    TRAIN_TO_CITYSCAPES_ID,
    colorize,
)
from pwda_fast.data.validate import describe

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
