"""The published folder layouts of GTA5, SYNTHIA RAND-CITYSCAPES and Cityscapes, and their labels.

Each layout lists (image, label) pairs of a split and turns a label file into 8-bit Cityscapes
trainIds (255 = void). `pwda-prepare` writes those trainIds once into a sibling
folder (`labels_trainIds/`, `GT/LABELS_trainIds/`, `gtFine_trainIds/`) and marks the prepared tree
complete; a complete prepared tree's labels are read instead of the raw labels (and by DALI, which
cannot decode palette or 16-bit class ids). Its optional JPEG copies of the images are offered to
the training sets only (data.image_format); evaluation always reads the original images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from pwda_fast.data.labels import (
    CITYSCAPES_ID_TO_TRAIN,
    CLASSES,
    IGNORE,
    SYNTHIA_ID_TO_TRAIN,
    SYNTHIA_MAX_ID,
    TRAIN_ID_TO_TRAIN,
)


def _channel0_16bit(path: Path) -> np.ndarray:
    """First channel of a PNG as (H, W) uint16, keeping all 16 bits.

    Pillow decodes 16-bit RGB(A) PNGs to 8 bits by keeping each sample's high byte, which is 0 for
    every SYNTHIA class id. Decoding the same data a second time with the little-endian raw mode
    yields the low bytes; the two together are the exact value.
    """
    img = Image.open(path)
    (tile,) = img.tile
    rawmode = tile.args if isinstance(tile.args, str) else tile.args[0]
    if img.mode.startswith("I"):  # single-channel 16-bit: Pillow keeps the full value
        return np.asarray(img).astype(np.uint16)
    if not rawmode.endswith(";16B"):  # an 8-bit label: the id is the first channel's value
        arr = np.asarray(img)
        return (arr[..., 0] if arr.ndim == 3 else arr).astype(np.uint16)
    high = np.asarray(img)[..., 0].astype(np.uint16)
    low_img = Image.open(path)
    low_img.tile = [tile._replace(args=rawmode[: -len(";16B")] + ";16L")]
    return (high << 8) | np.asarray(low_img)[..., 0]


def _read_8bit(path: Path, what: str, hint: str) -> np.ndarray:
    """A palette or grayscale PNG -> (H, W) uint8 values as stored; other modes name the file."""
    img = Image.open(path)
    if img.mode not in ("P", "L"):
        raise ValueError(f"{path}: expected {what}, got mode {img.mode}; {hint}")
    return np.asarray(img)


def read_label_ids(path: Path) -> np.ndarray:
    """An 8-bit label of class ids (GTA5 palette PNG, Cityscapes labelIds) -> (H, W) uint8 ids."""
    return _read_8bit(path, "a palette or grayscale PNG of class ids",
                      "colour-coded labels (e.g. *_color.png) cannot be used")


def read_synthia_ids(path: Path) -> np.ndarray:
    """A SYNTHIA GT/LABELS PNG (16-bit, class id in the first channel) -> (H, W) uint16 ids."""
    return _channel0_16bit(path)


def read_stored_train_ids(path: Path) -> np.ndarray:
    """An 8-bit trainId PNG (prepared or toy) -> (H, W) uint8 trainIds as stored."""
    return _read_8bit(path, "an 8-bit trainId label PNG", "rerun pwda-prepare")


def to_train_ids(path: Path, read=read_stored_train_ids, lut: np.ndarray = TRAIN_ID_TO_TRAIN) -> Image.Image:
    """Label file -> (H, W) trainId image, mode "L"; ids outside the table become 255 (void)."""
    ids = read(path)
    safe = np.minimum(ids, len(lut) - 1)  # ids past the table's end: its last entry is void
    out = lut[safe]
    out[ids >= len(lut)] = IGNORE
    return Image.fromarray(out, "L")


@dataclass(frozen=True)
class Layout:
    """One published dataset layout. Folders are relative to the dataset root."""

    name: str
    tree: str  # the expected folders, shown when they are missing
    image_dir: str
    label_dir: str
    label_suffix: tuple[str, str]  # (image name ending, label name ending)
    read_ids: object  # path -> (H, W) integer class ids
    lut: np.ndarray  # class id -> trainId
    known_ids: frozenset  # ids a valid raw label may contain
    label_modes: frozenset  # Pillow modes a raw label file may open as
    splits: dict  # split -> (subfolder under image_dir/label_dir, labelled?)

    def images(self, root: Path, split: str) -> list[Path]:
        """Sorted image paths of a split; an error showing the layout when none are there."""
        if split not in self.splits:
            raise ValueError(f"{self.name} has no {split!r} split; it serves as "
                             f"{' / '.join(sorted(self.splits))}")
        folder = root / self.image_dir / self.splits[split][0]
        found = sorted(folder.rglob(f"*{self.label_suffix[0]}")) if folder.is_dir() else []
        if not found:
            problem = "is missing" if not folder.is_dir() else f"has no *{self.label_suffix[0]} images"
            raise ValueError(f"{self.name}: {folder} {problem}. Expected layout under the root "
                             f"folder {root}:\n{self.tree}\nSet data.source_root / "
                             f"data.target_root (or --root) to the folder that holds it.")
        return found

    def label_for(self, root: Path, image: Path, split: str) -> Path:
        sub = self.splits[split][0]
        rel = image.relative_to(root / self.image_dir / sub)
        name = rel.name[: -len(self.label_suffix[0])] + self.label_suffix[1]
        return root / self.label_dir / sub / rel.parent / name

    def prepared_label(self, root: Path, prepared: Path, label: Path) -> Path:
        """Where prepare writes the trainId PNG of raw `label`: `<label_dir>_trainIds/`, same tree."""
        rel = label.relative_to(root / self.label_dir)
        name = rel.name.replace("_labelIds", "_labelTrainIds")
        return prepared / f"{self.label_dir}_trainIds" / rel.parent / name

    def prepared_image(self, root: Path, prepared: Path, image: Path) -> Path:
        """Where prepare writes the JPEG copy of `image`: `<image_dir>_jpeg/`, same tree."""
        rel = image.relative_to(root / self.image_dir)
        return prepared / f"{self.image_dir}_jpeg" / rel.with_suffix(".jpg")


GTA5 = Layout(
    name="gta5",
    tree="  images/00001.png ...        RGB frames\n"
         "  labels/00001.png ...        palette PNGs of Cityscapes label ids",
    image_dir="images", label_dir="labels", label_suffix=(".png", ".png"),
    read_ids=read_label_ids, lut=CITYSCAPES_ID_TO_TRAIN, known_ids=frozenset(range(35)),
    label_modes=frozenset({"P", "L"}),
    splits={"source": ("", True)},
)
SYNTHIA = Layout(
    name="synthia",
    tree="  RGB/0000000.png ...         RGB frames\n"
         "  GT/LABELS/0000000.png ...   16-bit PNGs, class id in the first channel",
    image_dir="RGB", label_dir="GT/LABELS", label_suffix=(".png", ".png"),
    read_ids=read_synthia_ids, lut=SYNTHIA_ID_TO_TRAIN, known_ids=frozenset(range(SYNTHIA_MAX_ID + 1)),
    label_modes=frozenset({"RGB", "RGBA", "I;16", "I;16B", "I", "L"}),
    splits={"source": ("", True)},
)
CITYSCAPES = Layout(
    name="cityscapes",
    tree="  leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png\n"
         "  gtFine/val/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png",
    image_dir="leftImg8bit", label_dir="gtFine",
    label_suffix=("_leftImg8bit.png", "_gtFine_labelIds.png"),
    read_ids=read_label_ids, lut=CITYSCAPES_ID_TO_TRAIN, known_ids=frozenset(range(34)),
    label_modes=frozenset({"P", "L"}),
    # Adaptation never sees target labels, so the train split is read without them.
    splits={"train": ("train", False), "val": ("val", True)},
)
LAYOUTS = {layout.name: layout for layout in (GTA5, SYNTHIA, CITYSCAPES)}
TRAIN_IDS = frozenset(range(len(CLASSES))) | {IGNORE}
STORED_MODES = frozenset({"L", "P"})


def marker(prepared: Path, layout: Layout) -> Path:
    """The file prepare writes last: a prepared tree without it is incomplete and not used."""
    return prepared / f".pwda_prepared_{layout.name}.json"


def read_marker(prepared: Path, layout: Layout) -> dict | None:
    path = marker(prepared, layout)
    return json.loads(path.read_text()) if path.is_file() else None


@dataclass
class Domain:
    """The files of one split, and how to read its labels.

    pairs: [(image, label or None)]; read_ids: label path -> (H, W) integer ids as stored; lut: ids ->
    trainIds; stored_train_ids: the labels are 8-bit trainId PNGs already (prepared or toy), which
    DALI can read; known_ids / label_modes: the values a valid label file may hold (checked by full
    validation) and the Pillow modes it may open as (checked from the header). A prepared tree adds
    jpeg: {image: its JPEG copy} (when prepare wrote them), raw_labels: {prepared label: the raw
    label it came from}, and prepare_command: the command that (re)writes it.
    """

    name: str
    pairs: list
    read_ids: object
    lut: np.ndarray
    stored_train_ids: bool
    known_ids: frozenset
    label_modes: frozenset
    jpeg: dict = field(default_factory=dict)
    raw_labels: dict = field(default_factory=dict)
    prepare_command: str = ""

    @property
    def label_reader(self):
        """label path -> (H, W) trainId image, mode "L" (picklable, for DataLoader workers)."""
        return partial(to_train_ids, read=self.read_ids, lut=self.lut)


def stored_domain(name: str, pairs: list) -> Domain:
    """Pairs whose labels are 8-bit trainId PNGs already (the toy domains, prepared trees)."""
    return Domain(name, pairs, read_stored_train_ids, TRAIN_ID_TO_TRAIN, True, TRAIN_IDS, STORED_MODES)


def prepare_command(name: str, root: Path, prepared: Path, jpeg: bool = False) -> str:
    """The prepare command line that (re)writes the prepared tree of `name` at `prepared`."""
    out = f" --out {prepared}" if prepared != root else ""
    return f"pwda-prepare --dataset {name} --root {root}{out}{' --jpeg' if jpeg else ''}"


def open_domain(name: str, root: str | Path, split: str, prepared_root: str | Path = "") -> Domain:
    """The (image, label) pairs of `split` of dataset `name` under `root`.

    Prepared trainId labels under `prepared_root` ("" = `root`) are used when prepare finished there
    for this split (its JPEG copies are listed in Domain.jpeg, not used here); otherwise raw labels
    are converted as they are read.
    """
    layout = LAYOUTS[name]
    root = Path(root)
    prepared = Path(prepared_root) if prepared_root else root
    images = layout.images(root, split)
    labelled = layout.splits[split][1]
    pairs = [(image, layout.label_for(root, image, split) if labelled else None) for image in images]
    done = read_marker(prepared, layout)
    if done is None or split not in done["splits"]:
        return Domain(name, pairs, layout.read_ids, layout.lut, False, layout.known_ids, layout.label_modes)
    raw_labels = {layout.prepared_label(root, prepared, lab): lab for _, lab in pairs if lab is not None}
    return replace(
        stored_domain(name, [(img, layout.prepared_label(root, prepared, lab) if lab else None)
                             for img, lab in pairs]),
        jpeg={img: layout.prepared_image(root, prepared, img) for img in images} if done["jpeg"] else {},
        raw_labels=raw_labels, prepare_command=prepare_command(name, root, prepared, done["jpeg"]))
