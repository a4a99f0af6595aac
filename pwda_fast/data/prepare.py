"""Convert a dataset's labels once to 8-bit trainId PNGs (and optionally its images to JPEG).

    pwda-prepare --dataset gta5|synthia|cityscapes --root DIR [--out DIR] [--jpeg]
    (or python -m pwda_fast.data.prepare ...)

Outputs go to sibling folders under --out (default: the dataset root): labels_trainIds/,
GT/LABELS_trainIds/ or gtFine_trainIds/, and with --jpeg images_jpeg/, RGB_jpeg/ or leftImg8bit_jpeg/
(quality 95, no chroma subsampling; DALI decodes JPEG on the GPU, PNG only on the CPU; only the
training sets read them, see data.image_format). The original files are only read. Each output is
written to a temporary name and renamed, and existing outputs are skipped, so an interrupted run
resumes where it stopped. A marker file written last, only when every split is there and every file
converted, tells training that the tree is complete (point data.source_prepared /
data.target_prepared at --out when it is not the root).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from pwda_fast.data.datasets import LAYOUTS, Layout, marker, read_marker, to_train_ids

JPEG_QUALITY = 95


def _write_atomic(out: Path, save) -> None:
    """save(tmp_path) then rename: a crash leaves no half-written file under the final name."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        save(tmp)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)


def convert_label(layout: Layout, src: Path, out: Path) -> None:
    train_ids = to_train_ids(src, read=layout.read_ids, lut=layout.lut)
    _write_atomic(out, lambda tmp: train_ids.save(tmp, format="PNG"))


def convert_image(src: Path, out: Path, quality: int = JPEG_QUALITY) -> None:
    with Image.open(src) as img:
        rgb = img.convert("RGB")
    _write_atomic(out, lambda tmp: rgb.save(tmp, format="JPEG", quality=quality, subsampling=0))


def tasks(layout: Layout, root: Path, out: Path, jpeg: bool) -> tuple[list, list[str]]:
    """-> ([(kind, source, output)] still to do, the splits). A missing split folder (images, or the
    labels of a labelled split) raises ValueError showing the layout: a tree is prepared whole."""
    missing = [root / folder / sub for sub, labelled in layout.splits.values()
               for folder in (layout.image_dir, layout.label_dir)[: 1 + labelled]
               if not (root / folder / sub).is_dir()]
    if missing:
        raise ValueError(f"{layout.name}: {', '.join(map(str, missing))} "
                         f"{'is' if len(missing) == 1 else 'are'} missing. Expected layout under "
                         f"{root}:\n{layout.tree}\nNothing was marked prepared; unpack the missing "
                         "folders (or point --root at the folder that holds them) and rerun")
    todo = []
    for split, (_, labelled) in layout.splits.items():
        for image in layout.images(root, split):
            if labelled:
                label = layout.label_for(root, image, split)
                todo.append(("label", label, layout.prepared_label(root, out, label)))
            if jpeg:
                todo.append(("image", image, layout.prepared_image(root, out, image)))
    return [t for t in todo if not t[2].is_file()], list(layout.splits)


def prepare(dataset: str, root: str | Path, out: str | Path | None = None, jpeg: bool = False,
            workers: int | None = None, progress: bool = True) -> tuple[Path, list[str]]:
    """Convert what is not converted yet; -> (marker path, or None when not every file converted,
    ["file: problem"] for the inputs that failed).

    Without the marker training keeps reading the raw labels (and the original images), so a tree
    with failed files is never mistaken for a complete one.
    """
    layout = LAYOUTS[dataset]
    root = Path(root)
    out = Path(out) if out else root
    todo, splits = tasks(layout, root, out, jpeg)

    def run(task) -> str | None:
        kind, src, dst = task
        try:
            convert_label(layout, src, dst) if kind == "label" else convert_image(src, dst)
        except Exception as e:  # report every unreadable input at the end, not only the first
            return f"{src}: {type(e).__name__}: {e}"
        return None

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        results = list(tqdm(pool.map(run, todo), total=len(todo), desc=f"prepare {dataset}",
                            disable=not progress, dynamic_ncols=True))
    failed = [r for r in results if r]
    if failed:
        return None, failed
    previous = read_marker(out, layout) or {}
    done = {"dataset": dataset, "root": str(root.resolve()), "splits": splits,
            "jpeg": jpeg or bool(previous.get("jpeg")), "jpeg_quality": JPEG_QUALITY}
    path = marker(out, layout)
    _write_atomic(path, lambda tmp: tmp.write_text(json.dumps(done, indent=2)))
    return path, failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pwda-prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, choices=sorted(LAYOUTS),
                        help="which published layout --root holds")
    parser.add_argument("--root", required=True, help="the dataset in its published layout")
    parser.add_argument("--out", help="where the prepared folders go (default: the root)")
    parser.add_argument("--jpeg", action="store_true",
                        help=f"also write JPEG images (quality {JPEG_QUALITY})")
    parser.add_argument("--workers", type=int, help="threads (default: all cores)")
    args = parser.parse_args(argv)
    try:
        path, failed = prepare(args.dataset, args.root, args.out, args.jpeg, args.workers)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in failed[:20]:
        print(f"failed: {line}", file=sys.stderr)
    if failed:
        shown = " (first 20 above)" if len(failed) > 20 else ""
        reasons = Counter(line.split(": ")[1] for line in failed)
        print(f"{len(failed)} inputs could not be converted{shown}: "
              f"{', '.join(f'{n} {why}' for why, n in reasons.most_common())}. The tree is not marked "
              "prepared, so training keeps reading the raw files. Fix or remove those files and rerun "
              "(finished outputs are kept and not converted again)", file=sys.stderr)
        return 1
    print(f"prepared {args.dataset}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
