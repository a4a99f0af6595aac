"""Small dataset trees in the published layouts of GTA5, SYNTHIA and Cityscapes, for the data tests.

Every image is painted from its own label: the red channel of a pixel is `colour(trainId)`, so an
image/label pair that went through crop, flip or rescale can be checked for alignment pixel by pixel.
The scene is left-right asymmetric, so a flip applied to only one of the two shows up too.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from pwda_fast.data.labels import CITYSCAPES_LABELS, IGNORE, SYNTHIA_TO_TRAIN

# One raw id per trainId: Cityscapes / GTA5 label ids and SYNTHIA class ids.
CITY_ID = {t: i for _, i, t in CITYSCAPES_LABELS if t != IGNORE}
SYNTHIA_ID = {t: i for i, t in SYNTHIA_TO_TRAIN.items()}
VOID_ID = {"gta5": 0, "cityscapes": 0, "synthia": 0}


def colour(train_ids: np.ndarray) -> np.ndarray:
    """trainId -> red value; 255 (void) -> 250. Steps of 12 survive bilinear blur and rounding."""
    return np.where(train_ids == IGNORE, 250, 10 + 12 * train_ids.astype(np.int64)).astype(np.uint8)


def scene(h: int, w: int, seed: int, classes=(0, 1, 2, 8, 10, 13)) -> np.ndarray:
    """(h, w) uint8 trainIds: blocks of 8x8 pixels with random classes, a void block top-left and a
    wide left-only band, so no flip or shift maps the scene onto itself."""
    rng = np.random.default_rng(seed)
    blocks = rng.choice(classes, size=(-(-h // 8), -(-w // 8))).astype(np.uint8)
    lab = np.kron(blocks, np.ones((8, 8), np.uint8))[:h, :w]
    lab[: h // 4, : w // 4] = IGNORE
    lab[h // 2: h // 2 + 8, : w // 3] = 11
    return lab


def painted(train_ids: np.ndarray) -> np.ndarray:
    """(h, w) trainIds -> (h, w, 3) uint8 RGB whose red channel encodes the class."""
    red = colour(train_ids)
    return np.stack([red, np.full_like(red, 90), np.full_like(red, 160)], -1)


def write_png16(path: Path, arr: np.ndarray) -> None:
    """(h, w, c) uint16 -> a 16-bit PNG (Pillow cannot write multi-channel 16-bit PNGs)."""
    h, w, c = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, {3: 2, 4: 6}[c], 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def raw_ids(train_ids: np.ndarray, dataset: str) -> np.ndarray:
    table = SYNTHIA_ID if dataset == "synthia" else CITY_ID
    lut = np.full(256, VOID_ID[dataset], np.int64)
    for t, i in table.items():
        lut[t] = i
    return lut[train_ids]


def write_label(path: Path, train_ids: np.ndarray, dataset: str) -> None:
    """Store trainIds as the dataset's raw label file (palette PNG, 16-bit PNG, labelIds PNG)."""
    ids = raw_ids(train_ids, dataset)
    path.parent.mkdir(parents=True, exist_ok=True)
    if dataset == "synthia":  # class id in channel 0, an instance id in channel 1, as published
        write_png16(path, np.stack([ids, np.full_like(ids, 300), np.zeros_like(ids)], -1).astype(np.uint16))
    elif dataset == "gta5":
        img = Image.fromarray(ids.astype(np.uint8), "P")
        img.putpalette([v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256)])
        img.save(path)
    else:
        Image.fromarray(ids.astype(np.uint8), "L").save(path)


def write_image(path: Path, train_ids: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(painted(train_ids)).save(path)


def make_tree(root: Path, dataset: str, n: int = 4, h: int = 48, w: int = 64, seed: int = 0) -> list:
    """Write `n` pairs (Cityscapes: n train images without labels and n labelled val pairs) under
    root in the published layout; -> [(image, label, trainIds)] of the labelled pairs."""
    out = []
    for i in range(n):
        lab = scene(h, w, seed * 1000 + i)
        if dataset == "gta5":
            img, lbl = root / "images" / f"{i:05d}.png", root / "labels" / f"{i:05d}.png"
        elif dataset == "synthia":
            img, lbl = root / "RGB" / f"{i:07d}.png", root / "GT" / "LABELS" / f"{i:07d}.png"
        else:
            city = ("aachen", "bochum")[i % 2]
            stem = f"{city}_{i:06d}_000019"
            write_image(root / "leftImg8bit" / "train" / city / f"{stem}_leftImg8bit.png", lab)
            city = ("frankfurt", "lindau")[i % 2]
            stem = f"{city}_{i:06d}_000019"
            img = root / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png"
            lbl = root / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png"
        write_image(img, lab)
        write_label(lbl, lab, dataset)
        out.append((img, lbl, lab))
    return out


def aligned_fraction(image: np.ndarray, label: np.ndarray) -> float:
    """image (3, h, w) normalised float, label (h, w) trainIds -> fraction of labelled pixels inside
    a region (same label 2 pixels away on every side, so resampling blur cannot reach them) whose
    red value matches the label's colour within half a colour step."""
    from pwda_fast.data import normalization
    red = normalization.undo(image.transpose(1, 2, 0), "imagenet")[..., 0]
    lab = label.astype(np.int64)
    p = np.pad(lab, 2, mode="edge")
    h, w = lab.shape
    inside = (lab != IGNORE) & np.logical_and.reduce(
        [p[2 + dy: 2 + dy + h, 2 + dx: 2 + dx + w] == lab for dy, dx in ((-2, 0), (2, 0), (0, -2), (0, 2))])
    ok = np.abs(red - colour(label).astype(np.float32)) < 6
    return float(ok[inside].mean()) if inside.any() else 1.0
