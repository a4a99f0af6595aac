"""Input pipeline throughput: images/s of the torch loader and the DALI pipeline, side by side.

    python bench/bench_data.py [--images 64] [--batch 4] [--workers 2] [--batches 40]

Writes a temporary Cityscapes-sized set (2048x1024 PNG images with 8-bit trainId labels, plus the
JPEG copies `prepare --jpeg` would make), then times each pipeline producing training batches at
1024x512 (resize 2048x1024 -> 1024x512, random 512x1024 crop, flip, normalise): images and labels
ready to feed the network, on the CPU or, for DALI with a GPU, on the GPU. Median of 3 runs after a
warm-up; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pwda_fast.data import dali
from pwda_fast.data.loader import SegmentationDataset, train_loader


def make_set(root: Path, n: int, h: int = 1024, w: int = 2048) -> tuple[list, list]:
    """n (image, label) PNG pairs plus JPEG copies of the images -> (png pairs, jpeg pairs)."""
    rng = np.random.default_rng(0)
    png, jpg = [], []
    for i in range(n):
        # Blocks of classes with per-pixel noise: compresses like a photo more than a flat render.
        lab = np.kron(rng.integers(0, 19, (h // 64, w // 64)), np.ones((64, 64), np.int64)).astype(np.uint8)
        img = (lab[..., None] * 12 + rng.integers(0, 24, (h, w, 3))).astype(np.uint8)
        paths = root / f"{i:03d}.png", root / f"{i:03d}_label.png", root / f"{i:03d}.jpg"
        Image.fromarray(img).save(paths[0], compress_level=1)
        Image.fromarray(img).save(paths[2], quality=95, subsampling=0)
        Image.fromarray(lab, "L").save(paths[1])
        png.append((paths[0], paths[1]))
        jpg.append((paths[2], paths[1]))
    return png, jpg


def rate(batches, batch_size: int, count: int, device: torch.device) -> float:
    """Images/s over `count` batches after 3 warm-up batches (median of 3 runs)."""
    runs = []
    for _ in range(3):
        for b in itertools.islice(batches, 3):
            b["image"].to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for b in itertools.islice(batches, count):
            b["image"].to(device), b["label"].to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        runs.append(count * batch_size / (time.perf_counter() - start))
    return statistics.median(runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per run")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    aug = dict(size=(1024, 512), crop=(512, 1024), flip=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        print(f"writing {args.images} 2048x1024 image/label pairs ...", file=sys.stderr)
        sets = dict(zip(("png", "jpeg"), make_set(Path(tmp), args.images)))
        for fmt, pairs in sets.items():
            ds = SegmentationDataset(pairs, **aug)
            torch_it = train_loader(ds, args.batch, 0, 0, 1, 0, args.workers, device.type == "cuda")
            rows.append(("torch DataLoader", fmt, f"{args.workers} workers",
                         rate(torch_it, args.batch, args.batches, device)))
            del torch_it
            if dali.available():
                dali_it = dali.train_loader(ds, args.batch, 0, 0, 1, 0, args.workers, device)
                where = "mixed (GPU)" if device.type == "cuda" else "CPU"
                rows.append((f"DALI {where}", fmt, f"{args.workers} threads",
                             rate(dali_it, args.batch, args.batches, device)))
                del dali_it
    cpu = platform.processor() or platform.machine()
    print(f"\n{args.images} images 2048x1024 -> batches of {args.batch} at 1024x512, "
          f"{os.cpu_count()} CPU cores ({cpu}), device {device}, torch {torch.__version__}\n")
    print("| loader | image files | parallelism | images/s |")
    print("|---|---|---|---|")
    for name, fmt, par, r in rows:
        print(f"| {name} | {fmt} | {par} | {r:.1f} |")
    if not dali.available():
        print(f"\nDALI not measured: {dali.import_error()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
