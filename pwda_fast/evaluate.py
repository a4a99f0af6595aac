"""Target-domain evaluation: per-class IoU and mIoU of a generator or a checkpoint.

    python -m pwda_fast.evaluate --checkpoint runs/toy/ckpt_00001000.pt [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pwda_fast import checkpoint, config, metrics
from pwda_fast.data import build_datasets
from pwda_fast.data.loader import val_loader
from pwda_fast.models import DeepLabV2

format_result = metrics.format_table


@torch.no_grad()
def predict(g: torch.nn.Module, image: torch.Tensor, size, amp: str = "none") -> torch.Tensor:
    """image (N, 3, H, W) -> main-head logits (N, K, *size), bilinear align_corners=True, fp32."""
    with torch.autocast(image.device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
        _, main, _ = g(image)
    return F.interpolate(main.float(), size=size, mode="bilinear", align_corners=True)


@torch.no_grad()
def evaluate_model(g: torch.nn.Module, dataset, device: torch.device, amp: str = "none",
                   progress: bool = False) -> dict:
    """Confusion over the whole dataset (labels at their stored resolution) -> iou table."""
    was_training = g.training
    g.eval()
    conf = torch.zeros(19, 19, dtype=torch.int64, device=device)
    for batch in tqdm(val_loader(dataset), disable=not progress, desc="evaluate", leave=False):
        label = batch["label"].to(device)
        logits = predict(g, batch["image"].to(device), tuple(label.shape[1:]), amp)
        conf += metrics.confusion(logits.argmax(1), label, 19)
    g.train(was_training)
    return metrics.iou_table(conf)


def load_generator(path: str, device: torch.device) -> tuple[DeepLabV2, config.Config]:
    """The generator of a training checkpoint, with the config it was trained with."""
    state = checkpoint.load(path)
    cfg = config.from_dict(state["config"])
    m = cfg.model
    g = DeepLabV2(m.num_classes, m.depth, m.width, m.bn)
    g.load_state_dict(state["g"])
    return g.to(device).eval(), cfg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pwda_fast.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a ckpt_*.pt written by pwda_fast.train")
    parser.add_argument("--json", help="also write {miou, iou} to this file")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    try:
        g, cfg = load_generator(args.checkpoint, device)
    except (RuntimeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = evaluate_model(g, build_datasets(cfg.data)["val"], device, progress=True)
    print(format_result(result, f"{args.checkpoint} on the {cfg.data.target} target val set"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
