"""The quantities behind the paper's Fig. 2, measured at each evaluation on a fixed set of target images.

The target training images carry no labels (adaptation never sees them), so the statistics are taken
on the first IMAGES target-val images, the same ones at every evaluation, with their ground truth:
how many pixels are confident enough (p* > T) to get the floor weight, and the mean weight w of
eq. (6) on the pixels of each class group (`data.class_groups`: toy_partial's aligned and shifted
classes, one group "all" elsewhere). The maps are weighting.target_maps, those of the Fig. 2 pictures,
computed as the generator stage computes them: on batches of data.batch_size target images with
BatchNorm on each batch's statistics (dropout off; every buffer and mode restored, so measuring
changes nothing in the run). Training weights the target crops of its batches; here whole val
images are batched, so the statistics are those of a training-like batch, not of one training step.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from pwda_fast import config, stats, weighting
from pwda_fast.run_folder import RunFolder

CHANCE = 2 * math.log(2)  # D_aux's BCE summed over source and target when it cannot tell them apart

# Target-val images measured (in batches of data.batch_size): at 1024x512, D_aux's first map at image
# size holds 256 x 524,288 fp32 values (0.5 GB) per image.
IMAGES = 8


def batches(val_dataset, images: int, batch: int):
    """The first `images` items of val_dataset as lists of at most `batch` items of one image size."""
    chunk = []
    for i in range(min(images, len(val_dataset))):
        item = val_dataset[i]
        if chunk and (len(chunk) == batch or chunk[0]["image"].shape != item["image"].shape):
            yield chunk
            chunk = []
        chunk.append(item)
    if chunk:
        yield chunk


@torch.no_grad()
def measure(g, d_aux, val_dataset, adapt_cfg, groups: dict[str, tuple[int, ...]],
            images: int = IMAGES, batch: int = 1) -> dict[str, float]:
    """-> {"above_t": fraction of all pixels with p* > adapt.threshold, and for each group G with
    labelled pixels among the images: "above_t_G" (the same fraction over G's pixels) and "weight_G"
    (mean w over G's pixels)}.

    g and d_aux: the bare networks, run under weighting.batch_statistics on `batch` images at a time
    (data.batch_size in training); val_dataset items are {"image": (3, H, W), "label": (h0, w0)
    trainIds}, labels brought to (H, W) by nearest neighbour. w is the map this run's adapt settings
    give (eq. 6 with D_aux for "gen+dis", else eq. 4), also for runs that do not weight (weighting
    "none", source-only): what weighting would do there.
    """
    device = next(g.parameters()).device
    above = total = 0.0
    sums = {name: [0.0, 0.0, 0] for name in groups}  # above-T pixels, weight sum, pixels
    for chunk in batches(val_dataset, images, batch):
        image = torch.stack([item["image"] for item in chunk]).to(device)  # (n, 3, H, W)
        maps = weighting.target_maps(g, d_aux, image, adapt_cfg)
        confident = maps["logits"].softmax(1).amax(1) > adapt_cfg.threshold  # (n, H, W)
        label = torch.cat([F.interpolate(item["label"][None, None].float(), size=confident.shape[1:],
                                         mode="nearest")[0] for item in chunk]).to(device).long()
        above += float(confident.sum())
        total += confident.numel()
        for name, classes in groups.items():
            member = torch.isin(label, torch.tensor(classes, device=device))  # void is in no group
            sums[name][0] += float(confident[member].sum())
            sums[name][1] += float(maps["weight"][member].sum())
            sums[name][2] += int(member.sum())
    out = {"above_t": above / total} if total else {}
    for name, (n_above, w_sum, n) in sums.items():
        if n:
            out[f"above_t_{name}"] = n_above / n
            out[f"weight_{name}"] = w_sum / n
    return out


def d_aux_at_end(run_dir: str | Path) -> dict[str, float]:
    """{"d_aux_end": D_aux's logged loss averaged over the last eighth of training} for a run that trains
    the paper's D_aux (weighting.trains_aux, adversary pwda: BCE summed over source and target, CHANCE =
    2 ln 2 when it cannot tell them apart, where sigmoid(a) is a constant 0.5 and DisMap carries no
    information); {} for other runs and for runs without a config.json or a logged d_aux."""
    folder = RunFolder(run_dir)
    saved = folder.read_config()
    if saved is None:
        return {}
    cfg = config.from_dict(saved)  # a run from before a key existed reads as what it ran
    a = cfg.adapt
    if a.mode != "adapt" or not weighting.trains_aux(a) or a.adversary != "pwda":
        return {}
    lines, _ = folder.read_metrics()
    tail = [r["d_aux"] for r in lines if "d_aux" in r and r["step"] > cfg.train.iters * 7 / 8]
    return {"d_aux_end": stats.mean(tail)} if tail else {}
