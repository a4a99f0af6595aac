"""Built-in toy domain pair: procedural street scenes, a clean synthetic source and a shifted target.

Both domains draw scenes from one layout distribution (sky, buildings, vegetation, road, sidewalk,
terrain, poles, cars, people as Cityscapes trainIds). The source is rendered flat and clean with a
game-like palette; the target, like a real camera, with another palette, dusk lighting, texture,
sensor noise, blur and JPEG compression. Files are written once, in a Cityscapes-like layout, so the
same file-reading code serves the toy and the real datasets:

    <root>/toy-v<VERSION>/<domain>/leftImg8bit/<split>/toy/<name>_leftImg8bit.png
    <root>/toy-v<VERSION>/<domain>/gtFine/<split>/toy/<name>_gtFine_labelTrainIds.png

with source/train (labelled), target/train (images only: adaptation never sees target labels) and
target/val (labelled, for evaluation). Bumping VERSION regenerates. `ensure_pair` writes any pair in
this layout; the `toy_partial` pair (toy_partial.py) uses it with this module's scenes.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

VERSION = 1
SIZE = (96, 192)  # (H, W): small enough for a CPU demo, large enough for poles and people
SPLITS = {("source", "train"): 600, ("target", "train"): 600, ("target", "val"): 100}

ROAD, SIDEWALK, BUILDING, POLE, VEGETATION, TERRAIN, SKY, PERSON, CAR = 0, 1, 2, 5, 8, 9, 10, 11, 13
TOY_CLASSES = (ROAD, SIDEWALK, BUILDING, POLE, VEGETATION, TERRAIN, SKY, PERSON, CAR)
# Every class shifts between the toy's domains: one group for per-group reports.
CLASS_GROUPS = {"all": TOY_CLASSES}

# Source: flat, saturated "game engine" colours.
SOURCE_COLOURS = {ROAD: (90, 90, 100), SIDEWALK: (170, 150, 160), BUILDING: (140, 100, 80),
                  POLE: (60, 60, 60), VEGETATION: (60, 150, 50), TERRAIN: (150, 170, 90),
                  SKY: (120, 180, 240), PERSON: (200, 60, 70), CAR: (40, 60, 170)}
# Target: a washed-out, warm camera palette in which several class colours move toward each other.
_TARGET_COLOURS = {ROAD: (110, 100, 95), SIDEWALK: (140, 130, 125), BUILDING: (120, 110, 105),
                   POLE: (90, 85, 80), VEGETATION: (85, 110, 60), TERRAIN: (130, 130, 90),
                   SKY: (200, 190, 170), PERSON: (150, 90, 80), CAR: (80, 80, 120)}
# Per-class texture strength in the target (vegetation and buildings are busy, sky is smooth).
_TARGET_TEXTURE = {ROAD: 10, SIDEWALK: 14, BUILDING: 22, POLE: 6, VEGETATION: 30, TERRAIN: 20,
                   SKY: 4, PERSON: 12, CAR: 12}


def default_root() -> Path:
    """$PWDA_FAST_DATA, else the user cache folder."""
    if os.environ.get("PWDA_FAST_DATA"):
        return Path(os.environ["PWDA_FAST_DATA"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pwda_fast"


def scene(rng: np.random.Generator, h: int = SIZE[0], w: int = SIZE[1]) -> tuple[np.ndarray, np.ndarray]:
    """One street scene: perspective road toward a random vanishing point.

    -> (labels (h, w) uint8 trainIds, instances (h, w) int32: k > 0 on the pixels the k-th car or
    person was drawn on, 0 elsewhere; a pixel later covered by another class keeps its instance id,
    so read instances only where the label is CAR or PERSON). Drawing the instance map takes nothing
    from `rng`, so the labels are the same with or without it.
    """
    lab = np.full((h, w), SKY, np.uint8)
    inst = np.zeros((h, w), np.int32)
    horizon = int(h * rng.uniform(0.38, 0.55))
    ys, xs = np.mgrid[0:h, 0:w]

    x = int(rng.integers(-w // 10, 0))
    while x < w:  # a skyline of buildings standing on the horizon
        bw, bh = int(rng.integers(w // 10, w // 4)), int(rng.uniform(0.15, 0.9) * horizon)
        if rng.random() < 0.85:
            lab[max(horizon - bh, 0):horizon, max(x, 0):x + bw] = BUILDING
        x += bw
    for _ in range(int(rng.integers(1, 4))):  # tree crowns in front of the buildings
        cx, cy, r = rng.uniform(0, w), horizon - rng.uniform(0.05, 0.3) * h, rng.uniform(0.06, 0.16) * h
        lab[(xs - cx) ** 2 + ((ys - cy) * 1.3) ** 2 < r * r] = VEGETATION

    vx = w * rng.uniform(0.35, 0.65)
    depth = np.clip((ys - horizon) / max(h - horizon, 1), 0, None)  # 0 at the horizon, 1 at the bottom
    road_half = depth * w * rng.uniform(0.35, 0.55) + 1
    walk = depth * w * rng.uniform(0.12, 0.2)
    ground = ys >= horizon
    lab[ground] = np.where(rng.random() < 0.5, TERRAIN, VEGETATION)
    lab[ground & (np.abs(xs - vx) < road_half + walk)] = SIDEWALK
    lab[ground & (np.abs(xs - vx) < road_half)] = ROAD

    for _ in range(int(rng.integers(0, 4))):  # cars on the road, larger when nearer
        d = rng.uniform(0.15, 0.9)
        yb = int(horizon + d * (h - horizon))
        ch, cw = max(int(d * h * 0.35), 3), max(int(d * w * 0.22), 4)
        cx = int(vx + rng.uniform(-0.8, 0.8) * (d * w * 0.45) - cw / 2)
        lab[max(yb - ch, 0):yb, max(cx, 0):max(cx + cw, 0)] = CAR
        inst[max(yb - ch, 0):yb, max(cx, 0):max(cx + cw, 0)] = inst.max() + 1
    for side in (-1, 1):  # people and poles along the sidewalks
        for _ in range(int(rng.integers(0, 3))):
            d = rng.uniform(0.2, 0.95)
            yb = int(horizon + d * (h - horizon))
            px = vx + side * (d * w * 0.45 + d * w * 0.08)
            ph, pw = max(int(d * h * 0.5), 4), max(d * w * 0.025, 1.0)
            cy = yb - ph / 2
            body = ((xs - px) / pw) ** 2 + ((ys - cy) / (ph / 2)) ** 2 < 1
            lab[body] = PERSON
            inst[body] = inst.max() + 1
        if rng.random() < 0.7:
            d = rng.uniform(0.3, 1.0)
            yb = int(horizon + d * (h - horizon))
            px = int(vx + side * (d * w * 0.5 + d * w * 0.12))
            top = max(int(horizon - rng.uniform(0.2, 0.5) * h), 0)
            lab[top:yb, max(px, 0):max(px + max(int(d * 3), 1), 0)] = POLE
    return lab, inst


def layout(rng: np.random.Generator, h: int = SIZE[0], w: int = SIZE[1]) -> np.ndarray:
    """One street scene as (h, w) uint8 trainIds (scene() without the instance map)."""
    return scene(rng, h, w)[0]


def _paint(lab: np.ndarray, colours: dict, rng: np.random.Generator, jitter: float) -> np.ndarray:
    img = np.zeros(lab.shape + (3,), np.float32)
    for cls, rgb in colours.items():
        img[lab == cls] = np.asarray(rgb, np.float32) + rng.normal(0, jitter, 3)
    return img


def render_source(lab: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flat, clean rendering: per-class colours with a small per-image jitter."""
    return np.clip(_paint(lab, SOURCE_COLOURS, rng, 8.0), 0, 255).astype(np.uint8)


def render_target(lab: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Camera-like rendering: other palette, lighting, texture, noise, blur and JPEG artefacts."""
    h, w = lab.shape
    img = _paint(lab, _TARGET_COLOURS, rng, 12.0)
    grain = rng.normal(0, 1, (h, w)).astype(np.float32)
    for cls, strength in _TARGET_TEXTURE.items():
        img[lab == cls] += strength * grain[lab == cls, None]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    light = rng.uniform(0.6, 1.1) * (1.0 - 0.35 * ((xs / w - rng.uniform(0, 1)) ** 2 + (ys / h) ** 2))
    img = img * light[..., None] + rng.normal(0, 6, img.shape).astype(np.float32)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    pil = pil.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.0)))
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=int(rng.integers(30, 60)))
    return np.asarray(Image.open(buf).convert("RGB"))


def _paths(root: Path, domain: str, split: str, name: str) -> tuple[Path, Path]:
    base = root / domain
    return (base / "leftImg8bit" / split / "toy" / f"{name}_leftImg8bit.png",
            base / "gtFine" / split / "toy" / f"{name}_gtFine_labelTrainIds.png")


def ensure_pair(root: str | Path | None, folder: str, title: str, splits: dict, scene_of, log=print) -> Path:
    """Generate a toy domain pair in root/folder (root None: default_root()) unless it is complete there.

    splits: {(domain, split): scene count}, written in this order; scene_of(domain, k) -> (image
    (H, W, 3) uint8, labels (H, W) uint8 trainIds) draws the k-th scene of the whole pair (k counts
    on across splits). target/train is written without labels. `title` goes into the COMPLETE marker
    and the log line.
    """
    root = Path(root) if root else default_root()
    out = root / folder
    if (out / "COMPLETE").is_file():
        return out
    log(f"generating the {title} domain pair ({sum(splits.values())} scenes) in {out} ...")
    tmp = root / f".{folder}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    k = 0
    for (domain, split), count in splits.items():
        for i in range(count):
            image, lab = scene_of(domain, k)
            k += 1
            img_path, lab_path = _paths(tmp, domain, split, f"toy_{i:06d}_000019")
            img_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(img_path)
            if not (domain == "target" and split == "train"):
                lab_path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(lab).save(lab_path)
    (tmp / "COMPLETE").write_text(f"{title}\n")
    try:
        tmp.rename(out)  # atomic: a concurrent generator (another rank) may have won the race
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "COMPLETE").is_file():
            raise
    return out


def _toy_scene(domain: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([VERSION, k])
    lab = layout(rng)
    return (render_source if domain == "source" else render_target)(lab, rng), lab


def ensure_toy(root: str | Path | None = None, log=print) -> Path:
    """Generate the toy domains under root (default: default_root()) unless this VERSION exists."""
    return ensure_pair(root, f"toy-v{VERSION}", f"toy v{VERSION}", SPLITS, _toy_scene, log)


def files(root: Path, domain: str, split: str) -> list[tuple[Path, Path | None]]:
    """(image, label or None) pairs of one toy split, sorted by name."""
    images = sorted((root / domain / "leftImg8bit" / split).rglob("*_leftImg8bit.png"))
    pairs = []
    for img in images:
        _, lab = _paths(root, domain, split, img.name[: -len("_leftImg8bit.png")])
        pairs.append((img, lab if lab.is_file() else None))
    return pairs
