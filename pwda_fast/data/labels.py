"""The 19 Cityscapes evaluation classes (trainIds 0..18, 255 = void) and their colours."""

from __future__ import annotations

import numpy as np

IGNORE = 255

CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
           "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
           "motorcycle", "bicycle")

# The Cityscapes colour of each trainId (the benchmark's visualisation palette).
PALETTE = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
], dtype=np.uint8)


def colorize(train_ids: np.ndarray) -> np.ndarray:
    """(H, W) trainIds -> (H, W, 3) uint8 RGB in the Cityscapes palette; void is black."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(PALETTE)] = PALETTE
    return lut[train_ids.astype(np.uint8)]


# Cityscapes label definitions (name, labelId, trainId) as published in cityscapesscripts'
# helpers/labels.py; the package itself pulls in matplotlib, requests and the obsolete `typing`
# backport for one table, so it is copied here and checked against it by tests/test_data_labels.py.
CITYSCAPES_LABELS = (
    ("unlabeled", 0, 255), ("ego vehicle", 1, 255), ("rectification border", 2, 255),
    ("out of roi", 3, 255), ("static", 4, 255), ("dynamic", 5, 255), ("ground", 6, 255),
    ("road", 7, 0), ("sidewalk", 8, 1), ("parking", 9, 255), ("rail track", 10, 255),
    ("building", 11, 2), ("wall", 12, 3), ("fence", 13, 4), ("guard rail", 14, 255),
    ("bridge", 15, 255), ("tunnel", 16, 255), ("pole", 17, 5), ("polegroup", 18, 255),
    ("traffic light", 19, 6), ("traffic sign", 20, 7), ("vegetation", 21, 8), ("terrain", 22, 9),
    ("sky", 23, 10), ("person", 24, 11), ("rider", 25, 12), ("car", 26, 13), ("truck", 27, 14),
    ("bus", 28, 15), ("caravan", 29, 255), ("trailer", 30, 255), ("train", 31, 16),
    ("motorcycle", 32, 17), ("bicycle", 33, 18),
)

# SYNTHIA RAND-CITYSCAPES class ids (its README) -> Cityscapes trainIds, as AdaptSegNet and ADVENT
# map them. SYNTHIA has no terrain, truck or train pixels, and ids 0 (void), 13 (parking slot),
# 14 (road work) and 22 (lane marking) have no Cityscapes class, so they become void.
SYNTHIA_TO_TRAIN = {1: 10, 2: 2, 3: 0, 4: 1, 5: 4, 6: 8, 7: 5, 8: 13, 9: 7, 10: 11, 11: 18, 12: 17,
                    15: 6, 16: 9, 17: 12, 18: 14, 19: 15, 20: 16, 21: 3}
SYNTHIA_MAX_ID = 22

# The evaluation protocols for SYNTHIA-trained models: 16 classes (no terrain, truck, train) and
# 13 classes (also no wall, fence, pole), both scored from the 19-class confusion.
SYNTHIA_16 = tuple(c for c in CLASSES if c not in ("terrain", "truck", "train"))
SYNTHIA_13 = tuple(c for c in SYNTHIA_16 if c not in ("wall", "fence", "pole"))


def lookup_table(mapping: dict[int, int], size: int = 256) -> np.ndarray:
    """{raw id: trainId} -> (size,) uint8 table; every id not in `mapping` maps to IGNORE."""
    lut = np.full(size, IGNORE, np.uint8)
    for raw, train in mapping.items():
        lut[raw] = train
    return lut


CITYSCAPES_ID_TO_TRAIN = lookup_table({i: t for _, i, t in CITYSCAPES_LABELS if t != IGNORE})
# The inverse for the 19 classes: (19,) uint8, the labelId of each trainId (7, 8, 11, ..., 33), what the
# Cityscapes benchmark's evaluation reads from prediction files.
TRAIN_TO_CITYSCAPES_ID = np.array([i for k in range(len(CLASSES)) for _, i, t in CITYSCAPES_LABELS if t == k],
                                  np.uint8)
SYNTHIA_ID_TO_TRAIN = lookup_table(SYNTHIA_TO_TRAIN, 1 << 16)
# Sanitises stored trainId labels: 0..18 stay, anything else (a stray 19, 254, ...) becomes void.
TRAIN_ID_TO_TRAIN = lookup_table({i: i for i in range(len(CLASSES))})
