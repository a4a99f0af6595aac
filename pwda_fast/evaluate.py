"""`pwda-evaluate`: per-class IoU and mIoU on the target val set of a checkpoint or of saved predictions.

    pwda-evaluate --checkpoint runs/toy/ckpt_00001000.pt [--protocol mrnet] [--amp none] [--json FILE]
    pwda-evaluate --checkpoint FILE --dataset cityscapes --root DIR [--json FILE]
    pwda-evaluate --checkpoint FILE [...] --save-predictions OUT [--format labelid]
    pwda-evaluate --predictions DIR --root DIR [--format ...] [--source synthia] [--json FILE]

Scores are over the 19 Cityscapes classes at the labels' full resolution (2048x1024 for Cityscapes
val). For SYNTHIA-trained models (the checkpoint's data.source, or --source synthia) the 16- and
13-class protocols are added as miou16 / miou13, averaged from the same 19-class confusion.
A checkpoint's predictions come from one of two test protocols (--protocol, default the
checkpoint's train.eval_protocol): "single", the main head's argmax at the val size, or "mrnet",
MRNet's fusion of both heads over two scales and flips (inference.fused_probabilities); the result's
"protocol" names it. Its forward passes run in the precision of its own evaluations (--amp, default
the checkpoint's train.amp), so a finished run scores what it recorded in final.json and best.json.
--save-predictions OUT also writes the prediction that was scored, at the label resolution, as one
PNG per val image: OUT/<image folder>/<image stem>.png, for Cityscapes val
OUT/<city>/<city>_<seq>_<frame>_leftImg8bit.png, the names the official evaluation
(cityscapesscripts' evalPixelLevelSemanticLabeling, CITYSCAPES_RESULTS=OUT) and the benchmark
server look for. --format: "trainid" (8-bit, 0..18), "labelid" (8-bit Cityscapes label ids, 7..33:
what the official evaluation and the test-set server read) or "color" (RGB, Cityscapes palette).
--predictions DIR scores such PNGs, read in --format, found for each val image as
<image stem>.png (any image extension: a .jpg image's prediction is a .png) in DIR or
DIR/<image folder>/. A pixel that names no evaluated class (trainId 255, a labelId such as 0 or 4,
black) counts as wrong, as the official evaluation counts it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from pwda_fast import checkpoint, distributed, inference, metrics, predictions
from pwda_fast.data import build_val
from pwda_fast.precision import AMP_DTYPES


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pwda-evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", help="a ckpt_*.pt or best.pt written by pwda-train")
    what.add_argument("--predictions", help="a folder of prediction PNGs (in --format) named like the "
                                            "val images, as --save-predictions writes them")
    parser.add_argument("--dataset", choices=("cityscapes",),
                        help="evaluate on this dataset at --root instead of the checkpoint's target")
    parser.add_argument("--root", help="the Cityscapes root (leftImg8bit/, gtFine/)")
    parser.add_argument("--source", choices=("gta5", "synthia", "toy"),
                        help="the model's source domain (default: the checkpoint's); synthia adds miou16/13")
    parser.add_argument("--protocol", choices=inference.PROTOCOLS,
                        help="how a checkpoint is scored: single (main head, one scale) or mrnet "
                             "(fused heads, scales 1 and 1.25, flips); default: its train.eval_protocol")
    parser.add_argument("--amp", choices=tuple(AMP_DTYPES),
                        help="autocast precision of a checkpoint's forward passes: none (fp32), bf16 or "
                             "fp16; default: its train.amp, the precision its own evaluations ran in")
    parser.add_argument("--save-predictions", metavar="DIR",
                        help="with --checkpoint: also write each scored prediction (label resolution) "
                             "to DIR/<city>/<image stem>.png, as the Cityscapes benchmark names them")
    parser.add_argument("--format", choices=predictions.FORMATS,
                        help="prediction PNGs written by --save-predictions or read by --predictions: "
                             "trainid (0..18), labelid (Cityscapes label ids, what the official "
                             "evaluation and the benchmark server read) or color (Cityscapes palette); "
                             "default trainid")
    parser.add_argument("--json", help="also write {miou, iou[, protocol, miou16, miou13]} to this file")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: cuda when a GPU is visible, else cpu (default auto)")
    return parser


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exits through parser.error on flags that do not go together; --format defaults to trainid."""
    if args.predictions and not args.root or args.dataset and not args.root:
        parser.error("--predictions and --dataset need --root (the Cityscapes folder)")
    if args.predictions and (args.protocol or args.amp):
        parser.error("--protocol and --amp score a --checkpoint; saved predictions are scored as they are")
    if args.predictions and args.save_predictions:
        parser.error("--save-predictions writes a --checkpoint's predictions; --predictions are saved")
    if args.format and not (args.predictions or args.save_predictions):
        parser.error("--format names the PNGs of --save-predictions or --predictions; give one of them")
    args.format = args.format or "trainid"


def _score_checkpoint(args: argparse.Namespace, device, writer) -> tuple[dict, str, str]:
    """--checkpoint -> (iou table, source domain, title)."""
    nets, cfg = checkpoint.load_networks(args.checkpoint, device)
    if args.dataset:  # another val set: a copy of the checkpoint's data section says which
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(
            cfg.data, target=args.dataset, target_root=args.root, target_prepared=""))
    protocol, amp = args.protocol or cfg.train.eval_protocol, args.amp or cfg.train.amp
    result = inference.evaluate_model(nets.g, build_val(cfg.data), device, amp, progress=True,
                                      protocol=protocol, writer=writer)
    title = (f"{args.checkpoint} on the {cfg.data.target} target val set ({protocol} protocol"
             + (f", {amp} autocast)" if amp != "none" else ")"))
    return result, args.source or cfg.data.source, title


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _check(parser, args)
    writer = None
    try:
        device = distributed.choose_device(args.device)
        if args.predictions:
            result = predictions.score_predictions(args.predictions, args.root, device, progress=True,
                                                   fmt=args.format)
            source, title = args.source, f"{args.predictions} on Cityscapes val ({args.root})"
        else:
            if args.save_predictions:
                writer = predictions.PredictionWriter(args.save_predictions, args.format)
            result, source, title = _score_checkpoint(args, device, writer)
    except (RuntimeError, OSError, ValueError) as e:  # OSError: unreadable inputs, an unwritable DIR
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = metrics.with_protocols(result, source)
    print(metrics.format_result(result, title))
    if writer:
        print(f"wrote {writer.count} {writer.fmt} prediction PNGs (the ones scored above) to "
              f"{writer.root}/<image folder>/")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
