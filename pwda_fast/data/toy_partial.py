"""Built-in toy pair `toy_partial`: some classes look the same in both domains, the others are shifted.

The pair the paper's argument is about (docs/TOY_PARTIAL.md gives each choice and its reason). Both
domains draw their scenes from the toy pair's layout generator (toy.scene), so they share one label
distribution, and both render with the toy source's flat palette, the same per-image colour jitter
and the same sensor noise. The target then repaints only the SHIFTED classes, each with a new colour
that lies nearer another class's source colour than its own, and a texture or inner structure the
source never shows:

    sidewalk  grey concrete with darker paving joints
    terrain   dry olive-brown ground with brightness grain
    car       white, black or red bodies (one per car) with a dark window band on the upper third
    person    blue, beige or dark tops over dark trousers

ALIGNED classes (road, building, pole, vegetation, sky) are rendered by the same code from the same
distributions in both domains. Files are written once per seed in the toy pair's layout,
<root>/toy_partial-v<VERSION>-s<seed>/, and read by the same code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pwda_fast.data import toy
from pwda_fast.data.toy import BUILDING, CAR, PERSON, POLE, ROAD, SIDEWALK, SKY, TERRAIN, VEGETATION

VERSION = 1
SEED = 0  # the pair training uses; another seed draws other scenes with the same design
SPLITS = dict(toy.SPLITS)  # as many scenes as the toy pair, at its image size (toy.SIZE)

ALIGNED = (ROAD, BUILDING, POLE, VEGETATION, SKY)
SHIFTED = (SIDEWALK, TERRAIN, PERSON, CAR)
CLASS_GROUPS = {"aligned": ALIGNED, "shifted": SHIFTED}

JITTER = 8.0  # sd of each class's per-image colour offset, both domains (the toy source's)
NOISE = 4.0  # sd of per-pixel sensor noise, both domains

# The target's shifted classes (RGB). Each lies nearer another class's source colour (toy.SOURCE_COLOURS)
# than its own: distances in docs/TOY_PARTIAL.md.
SIDEWALK_T = (120, 115, 110)
JOINT_PERIOD, JOINT_DARKEN = 6, 30.0  # paving joints: every 6th row and column, 30 levels darker
TERRAIN_T = (120, 110, 60)
TERRAIN_GRAIN = 18.0  # sd of per-pixel brightness grain
CAR_BODIES_T = ((190, 190, 195), (45, 45, 50), (160, 40, 40))
CAR_WINDOW_T = (50, 60, 75)
WINDOW_FRACTION = 0.35  # of each car's height, from its top
PERSON_TOPS_T = ((60, 70, 120), (200, 190, 160), (40, 40, 45))
PERSON_LEGS_T = (50, 55, 80)


def _colour(rgb, rng: np.random.Generator) -> np.ndarray:
    return np.asarray(rgb, np.float32) + rng.normal(0, JITTER, 3).astype(np.float32)


def _upper(mask: np.ndarray, fraction: float) -> np.ndarray:
    """The rows of `mask` (H, W) bool within the top `fraction` of its vertical extent."""
    rows = np.flatnonzero(mask.any(1))
    cut = rows[0] + fraction * (rows[-1] + 1 - rows[0])
    return mask & (np.arange(mask.shape[0])[:, None] < cut)


def _shift(img: np.ndarray, lab: np.ndarray, inst: np.ndarray, rng: np.random.Generator) -> None:
    """Repaint the shifted classes of (H, W, 3) float32 `img` in place with the target's appearance."""
    h, w = lab.shape
    ys, xs = np.mgrid[0:h, 0:w]
    walk = lab == SIDEWALK
    img[walk] = _colour(SIDEWALK_T, rng)
    img[walk & ((ys % JOINT_PERIOD == 0) | (xs % JOINT_PERIOD == 0))] -= JOINT_DARKEN
    ground = lab == TERRAIN
    img[ground] = _colour(TERRAIN_T, rng) + rng.normal(0, TERRAIN_GRAIN, (int(ground.sum()), 1))
    for cls, fills in ((CAR, CAR_BODIES_T), (PERSON, PERSON_TOPS_T)):
        for k in np.unique(inst[lab == cls]):
            body = (lab == cls) & (inst == k)
            img[body] = _colour(fills[rng.integers(len(fills))], rng)
            if cls == CAR:
                img[_upper(body, WINDOW_FRACTION)] = _colour(CAR_WINDOW_T, rng)
            else:
                img[body & ~_upper(body, 0.5)] = _colour(PERSON_LEGS_T, rng)


def render(lab: np.ndarray, inst: np.ndarray, rng: np.random.Generator, domain: str) -> np.ndarray:
    """labels (H, W) trainIds and instances (H, W) from toy.scene -> (H, W, 3) uint8 RGB of `domain`.

    Every class gets its toy source colour plus a per-image offset; the target then repaints the
    shifted classes (_shift); both add the same sensor noise.
    """
    img = np.zeros(lab.shape + (3,), np.float32)
    for cls, rgb in toy.SOURCE_COLOURS.items():
        img[lab == cls] = _colour(rgb, rng)
    if domain == "target":
        _shift(img, lab, inst, rng)
    img += rng.normal(0, NOISE, img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def scene(seed: int, domain: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k-th scene of the pair drawn from `seed` -> (image (H, W, 3) uint8, labels (H, W) uint8)."""
    rng = np.random.default_rng([VERSION, seed, k])
    lab, inst = toy.scene(rng)
    return render(lab, inst, rng, domain), lab


def ensure_toy_partial(root: str | Path | None = None, log=print, seed: int = SEED) -> Path:
    """Generate the pair under root (default: toy.default_root()) unless this VERSION and seed exist."""
    return toy.ensure_pair(root, f"toy_partial-v{VERSION}-s{seed}", f"toy_partial v{VERSION} seed {seed}",
                           SPLITS, lambda domain, k: scene(seed, domain, k), log)
