"""The torch input pipeline: paired image/label files -> normalised, jointly augmented batches.

Randomness is a pure function of (seed, epoch, position), never of worker scheduling, so a run that
resumes at step k reads exactly the batches an uninterrupted run would have read.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from pwda_fast.data import normalization
from pwda_fast.data.datasets import to_train_ids
from pwda_fast.data.labels import IGNORE

# PIL's filter for each data.interpolation; labels are always resized with NEAREST.
FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


# With data.skip_bad, a file that fails to decode is replaced by the next one in the list; this many
# failures in a row mean the data is broken rather than a few files.
MAX_CONSECUTIVE_BAD = 8


class DataError(ValueError):
    """A data file that cannot be used; the message names it and says what to do."""


def data_error_message(e: BaseException) -> str:
    """The message of a DataError, without the worker traceback a DataLoader wraps around it when
    it re-raises the error in the main process."""
    return str(e).rsplit(f"{DataError.__name__}: ", 1)[-1].strip()


def read_image(path: Path) -> Image.Image:
    return Image.open(path).convert("RGB")


class SegmentationDataset(Dataset):
    """pairs [(image, label or None)] -> {"image": (3, H, W) float32, "label": (H, W) int64, "index"}.

    pairs: [(image path, label path or None)]; label_reader: label path -> (H, W) trainId image,
    mode "L" (default: 8-bit trainId PNGs, values outside 0..18 read as void);
    labels_are_train_ids: the label files themselves are such PNGs (what DALI can read).
    size (width, height): the base size (image with `interpolation`, "bilinear" or "bicubic"; label
    nearest; resize_label=False keeps labels at their stored resolution, for evaluation at full
    resolution). Training scales the base size (or the stored size, without `size`) by a random factor
    in `scale` and resizes once, from the stored image straight to that size (as MRNet does and as
    the DALI pipeline does), then takes a random crop of `crop` (height, width) padded with the mean
    colour and void if needed, and a horizontal flip, all with identical parameters for image and
    label. `normalize` names the input normalisation (normalization.py;
    "auto" reads as "imagenet"). Items are (index, draw) pairs from InfiniteSampler; `draw` seeds
    the augmentation. A pair that fails to decode raises DataError naming it; with skip_bad the next
    pair stands in and the sample lists the skipped one under "skipped".
    """

    def __init__(self, pairs, size=None, crop=None, scale=(1.0, 1.0), flip=False, train=True,
                 label_reader=to_train_ids, labels_are_train_ids=True, resize_label=True,
                 normalize="imagenet", interpolation="bilinear", skip_bad=False):
        self.pairs = list(pairs)
        self.skip_bad = skip_bad
        self.size, self.crop, self.scale, self.flip, self.train = size, crop, tuple(scale), flip, train
        self.label_reader, self.labels_are_train_ids = label_reader, labels_are_train_ids
        self.resize_label = resize_label
        self.normalize = normalization.get(normalize).name
        if interpolation not in FILTERS:
            raise ValueError(f"interpolation {interpolation!r} is not one of {', '.join(FILTERS)}")
        self.interpolation = interpolation
        if train and not resize_label:
            raise ValueError("resize_label=False is for evaluation; training crops need aligned labels")

    def at_size(self, size) -> SegmentationDataset:
        """The same files and settings, images resized to `size` (width, height) instead."""
        resized = copy.copy(self)
        resized.size = tuple(size)
        return resized

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, item):
        index, draw = item if isinstance(item, tuple) else (item, 0)
        skipped = []
        for attempt in range(min(MAX_CONSECUTIVE_BAD, len(self.pairs))):
            i = (index + attempt) % len(self.pairs)
            try:
                img, lab = self._read(i)
            except DataError as e:
                if not self.skip_bad:
                    raise
                skipped.append(str(e))
                continue
            return {**self._sample(img, lab, draw), "index": i, "skipped": skipped}
        raise DataError(f"{len(skipped)} files in a row failed to decode, even with data.skip_bad=true "
                        f"(the last: {skipped[-1]}); check the dataset")

    def _read(self, index: int):
        """The pair's image (RGB) and label ("L" trainIds, or None); DataError names a file that fails."""
        img_path, lab_path = self.pairs[index]
        try:
            img = read_image(img_path)
        except OSError as e:  # e.g. a truncated file, which header-only validation cannot see
            raise DataError(f"{img_path}: the image does not decode ({e}); replace the file, or set "
                            "data.skip_bad=true to skip such files (data.validate=\"full\" finds them "
                            "all before training)") from None
        try:
            lab = self.label_reader(lab_path) if lab_path is not None else None
        except (OSError, ValueError) as e:
            raise DataError(f"{lab_path}: the label does not decode ({e}); replace the file, or set "
                            "data.skip_bad=true to skip such files") from None
        if lab is not None and lab.size != img.size:
            raise DataError(f"{lab_path}: label size {lab.size} differs from image {img_path} {img.size}")
        return img, lab

    def _sample(self, img, lab, draw: int) -> dict:
        """Decoded pair -> {"image": (3, h, w) float32, "label": (h, w) int64}, resized, augmented."""
        rng = np.random.default_rng(draw)
        size = self._output_size(img.size, rng)
        if size != img.size:  # one resize: the base size and the random scale combined
            img = img.resize(size, FILTERS[self.interpolation])
            if lab is not None and self.resize_label:
                lab = lab.resize(size, Image.NEAREST)
        image = np.asarray(img, np.float32)
        label = (np.asarray(lab, np.int64) if lab is not None
                 else np.full(image.shape[:2], IGNORE, np.int64))
        image = normalization.apply(image, self.normalize)  # (H, W, 3), the mean colour now 0
        if self.train:
            image, label = self._crop_and_flip(image, label, rng)
        return {"image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
                "label": torch.from_numpy(np.ascontiguousarray(label))}

    def _output_size(self, stored: tuple[int, int], rng) -> tuple[int, int]:
        """(width, height) an image of `stored` size is resized to: `size` (or the stored size), in
        training times one random factor in `scale`, rounded half up as the DALI pipeline rounds it."""
        w, h = tuple(self.size) if self.size else stored
        lo, hi = self.scale
        if not self.train or (lo, hi) == (1.0, 1.0):
            return w, h
        s = rng.uniform(lo, hi)
        return max(int(w * s + 0.5), 1), max(int(h * s + 0.5), 1)

    def _crop_and_flip(self, image, label, rng):
        """(H, W, 3) normalised image, (H, W) label -> the random crop, then the random flip."""
        if self.crop:
            ch, cw = self.crop
            h, w = label.shape
            if h < ch or w < cw:  # pad with the mean colour (0) / void so every crop has the same size
                ph, pw = max(ch - h, 0), max(cw - w, 0)
                image = np.pad(image, ((0, ph), (0, pw), (0, 0)))
                label = np.pad(label, ((0, ph), (0, pw)), constant_values=IGNORE)
                h, w = label.shape
            y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            image, label = image[y:y + ch, x:x + cw], label[y:y + ch, x:x + cw]
        if self.flip and rng.random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        return image, label


class InfiniteSampler(Sampler):
    """Endless, rank-sharded stream of (index, draw) from per-epoch seeded permutations.

    Rank r of `world` takes positions r, r+world, ... of the global stream; `start` skips the first
    `start` items of this rank's share (resume). Shards are disjoint within an epoch.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world: int = 1, start: int = 0):
        if size == 0:
            raise ValueError("cannot sample from an empty dataset")
        self.size, self.seed, self.rank, self.world, self.start = size, seed, rank, world, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        per_epoch = math.ceil(self.size / self.world)
        epoch, pos = divmod(self.start, per_epoch)
        while True:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.size, generator=g).tolist()
            order += order[: per_epoch * self.world - self.size]  # pad so every rank gets as many
            mine = order[self.rank::self.world]
            for p in range(pos, per_epoch):
                yield mine[p], (self.seed * 1_000_003 + epoch) * 1_000_003 + mine[p]
            epoch, pos = epoch + 1, 0

    def __len__(self) -> int:  # a DataLoader asks; the stream itself never ends
        return 2**62


def _collate(items):
    return {"image": torch.stack([i["image"] for i in items]),
            "label": torch.stack([i["label"] for i in items]),
            "index": torch.tensor([i["index"] for i in items]),
            "skipped": [s for i in items for s in i["skipped"]]}


def train_loader(dataset: SegmentationDataset, batch_size: int, seed: int, rank: int, world: int,
                 start_step: int, workers: int, pin_memory: bool = False) -> Iterator[dict]:
    """Endless batches; starting at `start_step` replays exactly what the earlier steps did not read."""
    sampler = InfiniteSampler(len(dataset), seed, rank, world, start=start_step * batch_size)
    # Its own generator: creating the iterator draws a worker base seed, which from the global
    # stream would shift the training step's randomness (dropout) between a run and its resume.
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        collate_fn=_collate, pin_memory=pin_memory, drop_last=True,
                        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
                        generator=torch.Generator().manual_seed(seed * 1_000_003 + rank))
    return iter(loader)


def val_loader(dataset: SegmentationDataset, workers: int = 0) -> DataLoader:
    # Its own generator: each iterator draws a base seed, which from the global stream would make an
    # evaluation during training shift the later steps' randomness (dropout).
    return DataLoader(dataset, batch_size=1, shuffle=False, num_workers=workers, collate_fn=_collate,
                      generator=torch.Generator().manual_seed(0))
