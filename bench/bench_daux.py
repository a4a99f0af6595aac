"""D_aux at image size: the literal form, the exact cheap form the engine runs, and the feature-size form.

    python bench/bench_daux.py [--image 128 256] [--width 256] [--threads 2]

Forms (forward + backward into the features, batch 2, F = 2048 layer4 channels at stride 8):
  literal   D_aux(upsample(features))       the paper's wording, computed as written
  image     D_aux(features, size)           the engine (adapt.aux_at = "image"): first 1x1 conv at
                                            feature size, its output upsampled; the same function
  feature   upsample(D_aux(features))       adapt.aux_at = "feature": a different, cheaper function
Each form runs in its own process so its peak resident memory (ru_maxrss, minus the process's
baseline after making the inputs) is its own; times are the median of --repeat runs after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import common
import torch
import torch.nn.functional as F

from pwda_fast.models.discriminator import FeatureDiscriminator

FORMS = ("literal", "image", "feature")


def macs(form: str, n: int, size, feat_hw, width: int, channels: int = 2048) -> float:
    """Forward multiply-adds of the 1x1 convs."""
    big, small = n * size[0] * size[1], n * feat_hw[0] * feat_hw[1]
    first, rest = channels * width, width * (width // 2) + (width // 2) * (width // 4) + width // 4
    return {"literal": big * (first + rest), "image": small * first + big * rest,
            "feature": small * (first + rest)}[form]


def run_one(form: str, size, width: int, repeat: int) -> dict:
    torch.manual_seed(0)
    feat_hw = (size[0] // 8 + 1, size[1] // 8 + 1)  # the ceil-mode stride-8 geometry: 65x129 at 512x1024
    d_aux = FeatureDiscriminator(2048, width)
    feat = torch.randn(2, 2048, *feat_hw, requires_grad=True)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def step():
        if form == "literal":
            out = d_aux(F.interpolate(feat, size=size, mode="bilinear", align_corners=True))
        elif form == "image":
            out = d_aux(feat, size)
        else:
            out = F.interpolate(d_aux(feat), size=size, mode="bilinear", align_corners=True)
        out.sum().backward()
        feat.grad = None
        d_aux.zero_grad(set_to_none=True)

    step()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    return {"form": form, "median_ms": 1e3 * statistics.median(times), "peak_mb": peak_mb,
            "gmac_fwd": macs(form, 2, size, feat_hw, width) / 1e9}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", type=int, nargs=2, default=[128, 256], metavar=("H", "W"))
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--form", choices=FORMS, help=argparse.SUPPRESS)  # one form, in a child process
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.form:
        print(json.dumps(run_one(args.form, tuple(args.image), args.width, args.repeat)))
        return 0
    rows = []
    for form in FORMS:
        out = subprocess.run([sys.executable, __file__, "--form", form, "--image", *map(str, args.image),
                              "--width", str(args.width), "--threads", str(args.threads),
                              "--repeat", str(args.repeat)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout))
    print(f"D_aux fwd+bwd, batch 2, image {args.image[0]}x{args.image[1]}, width {args.width}, "
          f"{args.threads} threads, {common.machine(torch.device('cpu'))}")
    print(f"{'form':<9} {'GMAC fwd':>9} {'median ms':>10} {'peak MB':>8}")
    for r in rows:
        print(f"{r['form']:<9} {r['gmac_fwd']:>9.2f} {r['median_ms']:>10.1f} {r['peak_mb']:>8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
