"""Pictures of a run: predictions in the Cityscapes palette, the paper's weighting maps, training curves.

    pwda-visualize --checkpoint FILE [--source-only FILE] [--images N | PATH ...] --out DIR
    pwda-visualize --curves RUN_DIR --out DIR

Per target image two PNGs: <name>_pred.png (image | ground truth | source-only | adapted, as in the
paper's Fig. 4) and <name>_maps.png (the three maps of Fig. 2: the generation-confidence map d of
eq. 3, the discrimination-confidence map sigmoid(D_aux), and the weight w of eq. 6 the run trained
with), computed as training computes them: each image in a batch of data.batch_size of the images
asked for, BatchNorm on that batch's statistics (the predictions are evaluation's, in eval mode).
`--curves` writes curves.png: every loss and the target mIoU over steps, from metrics.jsonl, drawn
with matplotlib (pip install 'pwda_fast[plots]'). `--images N` takes the first N images of the
checkpoint's target val set; paths of images from that set get their ground truth, other images are
shown without it. The pictures are drawn with PIL alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from pwda_fast import checkpoint, distributed
from pwda_fast.curves import plot_curves
from pwda_fast.data import build_val
from pwda_fast.data.loader import SegmentationDataset
from pwda_fast.pictures import drop_empty_label, render_image


def target_images(cfg, images: list[str]) -> list[tuple[str, dict]]:
    """`--images` -> [(name, {"image": (3, H, W), "label": (h0, w0) int64 or None})].

    ["N"] picks the first N images of the target val set; paths are resized like that set's images
    and get their ground truth when they belong to it.
    """
    size = cfg.data.target_size
    if len(images) == 1 and images[0].isdigit():
        val = build_val(cfg.data)
        count = min(int(images[0]), len(val))
        return [(_name(val.pairs[i][0]), drop_empty_label(val[i])) for i in range(count)]
    try:
        val = build_val(cfg.data)
        known = {Path(img).resolve(): i for i, (img, _) in enumerate(val.pairs)}
    except (FileNotFoundError, ValueError):  # no val set on this machine: pictures without labels
        val, known = None, {}
    items = []
    for text in images:
        path = Path(text)
        if not path.is_file():
            raise FileNotFoundError(f"--images: {path} is not a file (give image paths or a count)")
        index = known.get(path.resolve())
        # A file outside the val set gets what the val set's images get: the run's size, filter
        # and normalisation.
        item = val[index] if index is not None else SegmentationDataset(
            [(path, None)], size=size, train=False, normalize=cfg.data.normalize,
            interpolation=cfg.data.interpolation)[0]
        items.append((_name(path), drop_empty_label(item)))
    return items


def _name(image: str | Path) -> str:
    """frankfurt_000000_000294_leftImg8bit.png -> frankfurt_000000_000294 (names of the output PNGs)."""
    return Path(image).stem.removesuffix("_leftImg8bit")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pwda-visualize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a ckpt_*.pt or best.pt of an adapted run (holds G and D_aux)")
    parser.add_argument("--source-only", help="a ckpt_*.pt or best.pt of a source-only run, shown beside it")
    parser.add_argument("--images", nargs="+", default=["4"],
                        help="a count N (the first N target-val images) or image paths (default 4)")
    parser.add_argument("--target-root", help="the target dataset's root, if not where the run had it")
    parser.add_argument("--zoom", type=int, default=0, help="pixel-repeat factor (0 = auto)")
    parser.add_argument("--curves", help="a run_dir: plot its metrics.jsonl to OUT/curves.png")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: cuda when a GPU is visible, else cpu (default auto)")
    args = parser.parse_args(argv)
    if not args.checkpoint and not args.curves:
        parser.error("give --checkpoint FILE (pictures) and/or --curves RUN_DIR (training curves)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        device = distributed.choose_device(args.device)
        if args.curves:
            print(f"wrote {plot_curves(args.curves, out)}")
        if args.checkpoint:
            nets, cfg = checkpoint.load_networks(args.checkpoint, device)
            if args.target_root:  # the val images elsewhere: a copy of the data section says where
                cfg = dataclasses.replace(cfg, data=dataclasses.replace(
                    cfg.data, target_root=args.target_root, target_prepared=""))
            source = checkpoint.load_networks(args.source_only, device)[0].g if args.source_only else None
            items = target_images(cfg, args.images)
            for k, (name, item) in enumerate(items):
                # The maps of each image in a batch of data.batch_size of the images asked for (it and
                # the ones after it, wrapping round), as training weights a batch.
                batch = min(cfg.data.batch_size, len(items))
                others = [items[(k + j) % len(items)][1]["image"] for j in range(1, batch)]
                pred_fig, maps_fig, _, _ = render_image(nets.g, nets.d_aux, cfg.adapt, item, source,
                                                        args.zoom, normalize=cfg.data.normalize,
                                                        batch_with=others)
                pred_fig.save(out / f"{name}_pred.png")
                maps_fig.save(out / f"{name}_maps.png")
                print(f"wrote {out / f'{name}_pred.png'} and {name}_maps.png")
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
