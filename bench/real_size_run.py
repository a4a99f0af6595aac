"""The whole pipeline at real size: does the loader keep up with the GPU step?

    python bench/real_size_run.py --out DIR [--iters 100] [--workers 4 8] [--images 24]
    python bench/real_size_run.py --out DIR --cpu-dry-run        # tiny model and crop, 3 iterations

Writes GTA5 and Cityscapes trees in their published layouts at their real resolutions (GTA5 1914x1052
RGB with palette labels; Cityscapes 2048x1024 leftImg8bit train images and labelled val pairs), then
runs `torchrun --standalone --nproc_per_node=1 -m pwda_fast.train --config gta5_to_cityscapes` on them
once per worker count: bf16 autocast, channels_last, the MRNet evaluation protocol on a few val images
at the end, a checkpoint; `model.bn=train` because no init weights are given (the preset's frozen-affine
BatchNorm needs them; the arithmetic per step is the same). Training images/s is read from the run's
metrics.jsonl between the 20th step and the last (warm-up excluded) and set against the bench step's
images/s (the step suite's engine bf16 row in `--rows`) when given: a ratio near 1 means the
loader keeps up at that worker count. Appends its result to `--rows` as a "real_size" fact row
(bench/rows.py; gpu_check.sh's summary reads it) and prints a line per run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import rows
from PIL import Image

from pwda_fast.run_folder import RunFolder

GTA5_HW = (1052, 1914)
CITYSCAPES_HW = (1024, 2048)
# Cityscapes label ids of a few classes (road, sidewalk, building, vegetation, sky, car, person).
LABEL_IDS = np.array([7, 8, 11, 21, 23, 26, 24], np.uint8)


def _pair(image: Path, label: Path, hw: tuple[int, int], seed: int, palette: bool) -> None:
    """One image/label pair: blocks of classes (64 px) with per-pixel noise, so PNG sizes and decode
    times are those of real photos rather than of flat renders."""
    rng = np.random.default_rng(seed)
    h, w = hw
    blocks = rng.integers(0, len(LABEL_IDS), (-(-h // 64), -(-w // 64)))
    ids = LABEL_IDS[np.kron(blocks, np.ones((64, 64), np.int64))[:h, :w]]
    rgb = (ids[..., None] * 9 + rng.integers(0, 40, (h, w, 3))).astype(np.uint8)
    image.parent.mkdir(parents=True, exist_ok=True)
    label.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(image)
    lab = Image.fromarray(ids, "P" if palette else "L")
    if palette:  # GTA5 ships palette-mode PNGs whose indices are the Cityscapes label ids
        lab.putpalette([v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256)])
    lab.save(label)


def make_trees(root: Path, n: int, n_val: int) -> tuple[Path, Path]:
    gta5, city = root / "GTA5", root / "cityscapes"
    jobs = [(gta5 / "images" / f"{i:05d}.png", gta5 / "labels" / f"{i:05d}.png", GTA5_HW, i, True)
            for i in range(n)]
    for i in range(n):  # train images (their labels are never read), then labelled val pairs
        stem = f"aachen_{i:06d}_000019"
        jobs.append((city / "leftImg8bit" / "train" / "aachen" / f"{stem}_leftImg8bit.png",
                     city / "gtFine" / "train" / "aachen" / f"{stem}_gtFine_labelIds.png",
                     CITYSCAPES_HW, 1000 + i, False))
    for i in range(n_val):
        stem = f"frankfurt_{i:06d}_000019"
        jobs.append((city / "leftImg8bit" / "val" / "frankfurt" / f"{stem}_leftImg8bit.png",
                     city / "gtFine" / "val" / "frankfurt" / f"{stem}_gtFine_labelIds.png",
                     CITYSCAPES_HW, 2000 + i, False))
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        list(pool.map(lambda job: _pair(*job), jobs))
    return gta5, city


def images_per_s(lines: list[dict], batch: int, skip: int = 20) -> float | None:
    """Training images/s between step `skip` (or the first logged step) and the last, from the
    cumulative iterations/s (it_s) that every training line of metrics.jsonl carries."""
    steps = [(r["step"], r["step"] / r["it_s"]) for r in lines if r.get("it_s")]
    if len(steps) < 2:
        return None
    first = next((s for s in steps if s[0] >= skip), steps[0])
    last = steps[-1]
    if last[0] <= first[0]:
        first = steps[0]
    return 2 * batch * (last[0] - first[0]) / (last[1] - first[1])


def bench_step_images_per_s(path: Path | None) -> float | None:
    """images/s of the step suite's "engine bf16 channels_last" row in a rows file (bench/rows.py)."""
    timed = [r for r in rows.read(path) if r.get("kind") == "time" and r.get("suite") == "step"
             and r["provider"] == "engine bf16 channels_last"] if path else []
    return timed[-1]["images_per_step"] / rows.median(timed[-1]) if timed else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for the trees and the runs")
    p.add_argument("--iters", type=int, default=100, help="training iterations per run (default 100)")
    p.add_argument("--workers", type=int, nargs="+", default=[4, 8],
                   help="loader workers, one run each (default 4 8)")
    p.add_argument("--images", type=int, default=24, help="source and target train images (default 24)")
    p.add_argument("--rows", type=Path, default=None,
                   help="rows file (bench/rows.py): the step suite's engine bf16 row to compare with is read "
                        "from it, and this run's result is appended to it")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="tiny model and crop, 3 iterations, 4 images: checks the script, measures nothing")
    args = p.parse_args(argv)
    n, n_val, iters = (4, 2, 3) if args.cpu_dry_run else (args.images, 4, args.iters)
    t0 = time.perf_counter()
    gta5, city = make_trees(args.out / "data", n, n_val)
    print(f"trees written in {time.perf_counter() - t0:.0f} s: {n} GTA5 {GTA5_HW[1]}x{GTA5_HW[0]}, "
          f"{n} + {n_val} Cityscapes {CITYSCAPES_HW[1]}x{CITYSCAPES_HW[0]}", flush=True)
    batch = 2
    overrides = [f"--data.source_root={gta5}", f"--data.target_root={city}", "--model.bn=train",
                 f"--train.iters={iters}", f"--train.eval_every={iters}", f"--train.ckpt_every={iters}",
                 "--train.eval_images=2", "--train.amp=bf16", "--train.channels_last=true"]
    if args.cpu_dry_run:
        overrides += ["--model.depth=14", "--model.width=8", "--model.head_width=16", "--model.disc_width=8",
                      "--model.aux_disc_width=16", "--data.crop=[64,128]", "--train.amp=none",
                      "--train.channels_last=false", "--data.source_size=[320,176]",
                      "--data.target_size=[256,128]"]
    bench = bench_step_images_per_s(args.rows)
    result = {"iters": iters, "images": n, "runs": [], "bench_step_images_per_s": bench}
    for workers in [1] if args.cpu_dry_run else args.workers:
        run_dir = args.out / f"run_w{workers}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               "-m", "pwda_fast.train", "--config", "gta5_to_cityscapes", *overrides,
               f"--data.workers={workers}", f"--train.run_dir={run_dir}"]
        t = time.perf_counter()
        rc = subprocess.run(cmd).returncode
        run = {"workers": workers, "rc": rc, "seconds": round(time.perf_counter() - t, 1)}
        folder = RunFolder(run_dir)
        if rc == 0 and folder.metrics.exists():
            run["images_per_s"] = images_per_s(folder.read_metrics()[0], batch)
            run["best_written"] = folder.best.exists()
            if bench and run["images_per_s"]:
                run["of_bench_step"] = run["images_per_s"] / bench
        result["runs"].append(run)
        print(f"workers {workers}: {json.dumps(run)}", flush=True)
    rows.append(args.rows, {"kind": "fact", "name": "real_size", **result})
    return 0 if all(r["rc"] == 0 for r in result["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
