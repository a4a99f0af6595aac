"""Peak memory, model FLOPs and where the time goes in one train step, per bench_step.py provider.

    python bench/step_profile.py --device cuda --preset paper --rows rows.jsonl

bench_step.py times the providers interleaved, all built at once, so its process cannot tell one
provider's peak memory from another's. Here each provider is built alone, steps once (so optimizer
state exists), then steps again between torch.cuda.reset_peak_memory_stats() and
max_memory_allocated(): the peak of a training process that holds only that provider's networks,
optimizer state and one batch. Model FLOPs per iteration are counted once, with
torch.utils.flop_counter on one step of the eager AdaptSegNet loop (matmuls and convolutions,
forward and backward, as MFU counts them); the engine does the same arithmetic, so the same count
serves every row: MFU = FLOPs per iteration / median seconds per iteration / device peak FLOP/s.

Then each provider runs --profile-steps steps under torch.profiler: its device time by category
(convolution, norms, casts and copies, D_aux's upsampling and activations at image size, losses,
optimizer, other: each op's self time, by its name, CATEGORIES), the device's busy time (the sum of its
kernels, memsets and copies) against the wall time of those steps (the GPU-busy fraction; the rest is
the GPU waiting for the host), per step. On CPU the categories hold each op's self CPU time and the
busy fraction is left out.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import bench_step  # bench/ is on sys.path: it is this script's folder
import common
import rows
import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense bf16 tensor-core peak, FLOP/s (vendor data sheets, SXM parts); MFU is quoted against it for
# every row, fp32 ones included, so rows compare. Override with --peak-tflops or PWDA_PEAK_TFLOPS.
PEAK_BF16_FLOPS = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362e12}


def peak_flops(device: torch.device, override_tflops: float | None) -> tuple[float | None, str]:
    if override_tflops:
        return override_tflops * 1e12, f"given: {override_tflops} TFLOP/s"
    if device.type != "cuda":
        return None, "no peak for CPU"
    name = torch.cuda.get_device_name()
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops, f"{key} dense bf16 {flops / 1e12:.1f} TFLOP/s"
    return None, f"unknown device {name!r}: pass --peak-tflops"


# Category -> substrings of op names (first match wins, in this order). Self times, so nothing counts twice.
CATEGORIES = {
    "convolution": ("conv",),
    "norm (BatchNorm, GroupNorm)": ("batch_norm", "group_norm", "native_norm"),
    "D_aux image size (upsample, leaky ReLU)": ("upsample", "leaky_relu"),
    "loss": ("weighted_adv_loss", "cross_entropy", "nll_loss", "log_softmax", "binary_cross_entropy",
             "softmax", "kl_div"),
    "optimizer": ("_foreach", "_fused_sgd", "_fused_adam", "sgd", "adam"),
    "casts and copies": ("copy_", "_to_copy", "clone", "cat", "contiguous"),
}


def category(op: str) -> str:
    return next((cat for cat, keys in CATEGORIES.items() if any(k in op for k in keys)), "other")


def breakdown(prov, batches, device: torch.device, steps: int) -> dict:
    """Per step: wall ms, device-busy ms and fraction (CUDA), and ms by CATEGORIES of the ops' self
    device time (CUDA) or self CPU time (CPU), over `steps` steps after the provider's warm-up."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    common.sync(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for i in range(steps):
            prov.step(2 + i, *batches[i % len(batches)])
        common.sync(device)
        wall = time.perf_counter() - t0
    by_cat = dict.fromkeys([*CATEGORIES, "other"], 0.0)
    for avg in prof.key_averages():
        self_us = avg.self_device_time_total if cuda else avg.self_cpu_time_total
        by_cat[category(avg.key)] += self_us / 1e3 / steps
    out = {"steps": steps, "wall_ms_per_step": wall * 1e3 / steps, "ms_per_step": by_cat,
           "time_kind": "device (self CUDA time)" if cuda else "host (self CPU time)"}
    if cuda:
        busy = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA)
        out["device_busy_ms_per_step"] = busy / 1e3 / steps
        out["busy_fraction"] = busy / 1e6 / wall
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--preset", default="toy", choices=sorted(bench_step.PRESETS))
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--crop", type=int, nargs=2, default=None, metavar=("H", "W"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--peak-tflops", type=float, default=float(os.environ.get("PWDA_PEAK_TFLOPS", 0)) or None)
    p.add_argument("--profile-steps", type=int, default=3, help="profiled steps per provider (default 3)")
    p.add_argument("--rows", type=Path, required=True,
                   help="append one \"profile\" fact row per provider to this rows file (bench/rows.py)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    base, ctors = bench_step.providers(args.preset, device, batch=args.batch, crop=args.crop)
    batches = bench_step.make_batches(base, 2, device)
    peak, peak_note = peak_flops(device, args.peak_tflops)
    flops, failed = None, False
    for i, (name, ctor) in enumerate(ctors.items()):
        row = {"kind": "fact", "name": "profile", "provider": name, "preset": args.preset,
               "peak_flops": peak, "peak_note": peak_note}
        prov = None
        try:
            prov = ctor()
            prov.step(0, *batches[0])  # optimizer state, cudnn plans, lazy inits
            common.sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            if i == 0:  # the eager loop: count its FLOPs on this step (the engine does the same arithmetic)
                with FlopCounterMode(display=False) as counter:
                    prov.step(1, *batches[1])
                flops = counter.get_total_flops()
            else:
                prov.step(1, *batches[1])
            for _ in range(3 if "CUDA graphs" in name else 0):  # its eager steps, its capture: not profiled
                prov.step(1, *batches[1])
            common.sync(device)
            row["peak_memory_bytes"] = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
            row["breakdown"] = breakdown(prov, batches, device, args.profile_steps)
            row["flops_per_iter"] = flops
        except Exception as e:  # one provider's failure is its row; the others are still profiled
            row["error"], failed = common.error_text(e), True
        del prov  # a failed provider's networks go too, before the next one is built
        rows.append(args.rows, row)  # written at once: a cut-short run keeps what it measured
        print(json.dumps(row), flush=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
