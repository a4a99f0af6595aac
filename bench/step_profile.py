"""Peak memory and model FLOPs of one train step, per bench_step.py provider (MFU for gpu_check.sh).

    python bench/step_profile.py --device cuda --preset paper --json step_profile.json

bench_step.py times the providers interleaved, all built at once, so its process cannot tell one
provider's peak memory from another's. Here each provider is built alone, steps once (so optimizer
state exists), then steps again between torch.cuda.reset_peak_memory_stats() and
max_memory_allocated(): the peak of a training process that holds only that provider's networks,
optimizer state and one batch. Model FLOPs per iteration are counted once, with
torch.utils.flop_counter on one step of the eager AdaptSegNet loop (matmuls and convolutions,
forward and backward, as MFU counts them); the engine does the same arithmetic, so the same count
serves every row: MFU = FLOPs per iteration / median seconds per iteration / device peak FLOP/s.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

import bench_step  # bench/ is on sys.path: it is this script's folder
import common
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--preset", default="toy", choices=sorted(bench_step.PRESETS))
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--crop", type=int, nargs=2, default=None, metavar=("H", "W"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--peak-tflops", type=float, default=float(os.environ.get("PWDA_PEAK_TFLOPS", 0)) or None)
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    base, ctors = bench_step.providers(args.preset, device, batch=args.batch, crop=args.crop)
    batches = bench_step.make_batches(base, 2, device)
    peak, peak_note = peak_flops(device, args.peak_tflops)
    result = {"device": device.type, "preset": args.preset, "batch": base.data.batch_size,
              "crop": list(base.data.crop), "peak_flops": peak, "peak_note": peak_note,
              "flops_per_iter": None, "peak_memory_bytes": {}}

    for i, (name, ctor) in enumerate(ctors.items()):
        prov = ctor()
        prov.step(0, *batches[0])  # optimizer state, cudnn plans, lazy inits
        common.sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        if i == 0:  # the eager loop: count its FLOPs on this step
            with FlopCounterMode(display=False) as counter:
                prov.step(1, *batches[1])
            result["flops_per_iter"] = counter.get_total_flops()
        else:
            prov.step(1, *batches[1])
        common.sync(device)
        peak_mem = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
        result["peak_memory_bytes"][name] = peak_mem
        print(f"{name:<40} peak memory "
              + (f"{peak_mem / 2**30:.2f} GiB" if peak_mem is not None else "n/a (cpu)"), flush=True)
        del prov
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"model FLOPs per iteration: {result['flops_per_iter'] / 1e9:.1f} GFLOP; peak: {peak_note}")
    args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
