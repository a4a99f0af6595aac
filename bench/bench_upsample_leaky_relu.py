"""upsample_leaky_relu (D_aux's first activation at image size): eager vs torch.compile vs Triton.

    python bench/bench_upsample_leaky_relu.py --device cuda [--shape 2 256 65 129] [--size 512 1024]
                                              [--dtype bf16] [--json FILE]

The paper step's call: D_aux's first conv output (2, 256, 65, 129), channels_last, upsampled to
512x1024 (the generator stage passes the 2 target images, the discriminator stage 4). Forward and
forward+backward (the gradient w.r.t. the input), providers interleaved (bench/common.py); wall time per
call and, on CUDA, device time and device operations per call; bandwidth from the minimal bytes (read
x, write the output; for fwd+bwd also read the upstream gradient and the output, write x's gradient)
over the device time, as a fraction of the measured copy bandwidth. On CPU only eager and compile run
(Triton's interpreter is a correctness tool).
"""

from __future__ import annotations

import argparse
import json

import common
import torch

from pwda_fast import ops, reference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def providers(device: str, compile_reference: bool) -> dict:
    fns = {"eager": lambda x, size: reference.upsample_leaky_relu(x, size, 0.2)}
    if compile_reference:
        compiled = torch.compile(reference.upsample_leaky_relu, dynamic=False)
        fns["compile"] = lambda x, size: compiled(x, size, 0.2)
    if ops.UPSAMPLE.problem("triton", device) is None and device == "cuda":
        fns["triton"] = lambda x, size: ops.upsample_leaky_relu(x, size, backend="triton")
    return fns


def minimal_bytes(shape, size, dtype, mode: str) -> int:
    n, c, h, w = shape
    small, big = n * c * h * w, n * c * size[0] * size[1]
    elems = small + big + (2 * big + small if mode == "fwd+bwd" else 0)
    return elems * torch.empty((), dtype=dtype).element_size()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"],
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", type=int, nargs=4, default=[2, 256, 65, 129], metavar=("N", "C", "h", "w"))
    p.add_argument("--size", type=int, nargs=2, default=[512, 1024], metavar=("H", "W"))
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--rounds", type=int, default=10, help="timed rounds (default 10)")
    p.add_argument("--calls", type=int, default=5, help="back-to-back calls per sample (default 5)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    device, dtype, size = args.device, DTYPES[args.dtype], tuple(args.size)
    x = torch.randn(args.shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    fns = providers(device, not args.no_compile)

    def fwd(fn):
        return lambda: fn(x, size)

    def fwd_bwd(fn):
        def run():
            x.grad = None
            out = fn(x, size)
            out.backward(torch.ones_like(out))
        return run

    calls = {(name, mode): (fwd if mode == "fwd" else fwd_bwd)(fn) for name, fn in fns.items()
             for mode in ("fwd", "fwd+bwd")}
    times = common.interleave(calls, device, args.rounds, warmup=2, calls_per_sample=args.calls)
    copy = common.copy_bandwidth(device)
    result = {"device": device, "machine": common.machine(device), "torch": torch.__version__,
              "shape": args.shape, "size": list(size), "dtype": args.dtype, "copy_gb_per_s": copy, "rows": []}
    print(f"upsample_leaky_relu {tuple(args.shape)} -> {size} {args.dtype} channels_last on "
          f"{result['machine']}, copy {copy:.0f} GB/s")
    print(f"{'provider':>8} {'mode':>7} {'wall ms':>9} {'dev ms':>8} {'ops':>5} {'of copy':>8}")
    for (name, mode), ts in times.items():
        wall = common.spread(ts)["median"]
        dev = common.device_time(calls[(name, mode)], device, args.calls)
        seconds = dev[0] if dev else wall
        frac = minimal_bytes(args.shape, size, dtype, mode) / seconds / 1e9 / copy
        row = {"provider": name, "mode": mode, "median_ms": wall * 1e3,
               "device_ms": dev[0] * 1e3 if dev else None, "device_ops_per_call": dev[1] if dev else None,
               "fraction_of_copy": frac}
        result["rows"].append(row)
        dev_text = f"{dev[0] * 1e3:>8.3f} {dev[1]:>5.1f}" if dev else f"{'-':>8} {'-':>5}"
        print(f"{name:>8} {mode:>7} {wall * 1e3:>9.3f} {dev_text} {frac:>8.1%}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
