"""What `prepare --jpeg` changes, measured on the toy pair: the pixel error of the JPEG copies, and the
target mIoU of a PWDA toy run trained on JPEG-compressed inputs vs the original PNGs (same seed; both
scored on the original val images, as evaluation always is).

    python bench/jpeg_effect.py [--iters N] [--out runs/jpeg_effect]

The JPEG run reads a copy of the toy tree whose training images went through prepare's encoder
(quality 95, no chroma subsampling) and were stored back losslessly: the same pixels the JPEG copies
give the training sets.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from pwda_fast import train
from pwda_fast.data import toy
from pwda_fast.data.prepare import JPEG_QUALITY


def jpeg_pixels(path: Path) -> np.ndarray:
    """(H, W, 3) uint8: the image after a round trip through prepare's JPEG encoder."""
    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return np.asarray(Image.open(buf).convert("RGB"))


def jpeg_tree(src: Path, dst: Path) -> dict:
    """Copy the toy tree to dst with every training image JPEG-round-tripped -> pixel error stats."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    errors = []
    for image in dst.glob("*/leftImg8bit/train/**/*_leftImg8bit.png"):
        original = np.asarray(Image.open(image).convert("RGB"), np.float64)
        degraded = jpeg_pixels(image)
        errors.append(np.abs(degraded - original))
        Image.fromarray(degraded).save(image)
    err = np.concatenate([e.ravel() for e in errors])
    mse = float(np.mean(err**2))
    return {"images": len(errors), "mean_abs_error": float(err.mean()), "max_abs_error": float(err.max()),
            "psnr_db": float(10 * np.log10(255**2 / mse)) if mse else float("inf")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=None, help="train.iters (default: the toy preset's)")
    parser.add_argument("--out", default="runs/jpeg_effect")
    args = parser.parse_args(argv)
    out = Path(args.out)
    original = toy.ensure_toy()
    copy_root = out / "toy_jpeg"
    pixels = jpeg_tree(original, copy_root / original.name)
    print(f"JPEG copies of {pixels['images']} training images: mean |error| {pixels['mean_abs_error']:.3f}, "
          f"max {pixels['max_abs_error']:.0f}, PSNR {pixels['psnr_db']:.2f} dB", flush=True)
    results = {"pixels": pixels}
    for name, root in (("png", ""), ("jpeg", str(copy_root))):
        argv = ["--config", "toy", f"--train.run_dir={out / name}", f"--data.source_root={root}",
                f"--data.target_root={root}"] + ([f"--train.iters={args.iters}"] if args.iters else [])
        # target-val is read from the same tree: its images are untouched in the copy.
        code, final = train.run_for_result(argv, f"training on {name} inputs")
        if code:
            return code
        results[name] = final["miou"]
    print(f"target mIoU: PNG inputs {results['png']:.2f}, JPEG inputs {results['jpeg']:.2f} "
          f"(difference {results['jpeg'] - results['png']:+.2f})")
    (out / "jpeg_effect.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
