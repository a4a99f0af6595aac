"""Forward+backward time of weighted_adv_loss: eager reference, torch.compile(reference), ext, triton.

    python bench/bench_loss.py --device cpu [--shapes tiny|small|default|full|gpu] [--json FILE]

Providers run interleaved (one call each per round), so a busy machine slows them alike. Reports the
median and p20/p80 over rounds and the achieved bandwidth from the minimal byte count: read seg,
disc and aux once, write the fp32 gradient once. On CUDA also the device copy bandwidth (a large
clone) and the fraction of it each provider reaches.

`--shapes lowres` passes D's and D_aux's maps at their native resolution (production: D (16, 32) and
D_aux (65, 129) for a 512x1024 crop): the fused kernels upsample them in-kernel, the eager and compiled
references upsample with F.interpolate (align_corners=True) inside reference.weighted_adv_loss, and
"ext+up" (the path before in-kernel upsampling) upsamples with F.interpolate, then runs ext.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from pwda_fast import ops, reference

SHAPES = {
    "tiny": [(1, 19, 16, 32)],  # gpu_check.sh --cpu-dry-run
    "small": [(1, 19, 64, 128), (2, 19, 256, 512)],
    "default": [(1, 19, 128, 256), (2, 19, 256, 512)],
    "full": [(1, 19, 128, 256), (2, 19, 256, 512), (4, 19, 512, 1024)],
    "gpu": [(4, 19, 512, 1024), (4, 19, 1024, 2048)],  # production shape and full Cityscapes size
    # (seg shape, D map (h, w), D_aux map (h, w)): native-resolution maps, upsampled in the loss.
    # The same shape with full-size maps (upsampled before the loss) runs alongside for comparison.
    "lowres": [((4, 19, 512, 1024), (16, 32), (65, 129)), (4, 19, 512, 1024)],
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def split(entry):
    """A SHAPES entry -> (seg shape, D map (h, w), D_aux map (h, w)); plain shapes use full-size maps."""
    if isinstance(entry[0], tuple):
        return entry
    return entry, tuple(entry[2:]), tuple(entry[2:])


def minimal_bytes(shape, dtype, disc_hw=None, aux_hw=None) -> int:
    """Bytes a one-pass kernel must move: seg (C values), disc and aux maps in, fp32 grad per pixel out."""
    n, c, h, w = shape
    disc_hw, aux_hw = disc_hw or (h, w), aux_hw or (h, w)
    size = torch.empty((), dtype=dtype).element_size()
    return (n * h * w * (c * size + 4)
            + n * (disc_hw[0] * disc_hw[1] + aux_hw[0] * aux_hw[1]) * size)


def providers(device: str, compile_reference: bool):
    """name -> f(seg, disc, aux) returning the loss, all with label 1 and the paper's T, floor, mu."""
    out = {"eager": lambda s, d, a: reference.weighted_adv_loss(s, d, a, label=1.0)}
    if compile_reference:
        compiled = torch.compile(reference.weighted_adv_loss, dynamic=False)
        out["compile"] = lambda s, d, a: compiled(s, d, a, label=1.0)
    for backend in ("ext", "triton"):
        if ops._PROBLEMS[backend](device) is None and not (backend == "triton" and device == "cpu"):
            out[backend] = lambda s, d, a, b=backend: ops.weighted_adv_loss(s, d, a, label=1.0, backend=b)
    return out


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def fwd_bwd(fn, seg, disc, aux) -> None:
    disc.grad = None
    fn(seg, disc, aux).backward()


def time_providers(fns, seg, disc, aux, device, rounds, warmup):
    """Seconds per fwd+bwd call: name -> list over rounds, providers interleaved within a round."""
    for fn in fns.values():
        for _ in range(warmup):
            fwd_bwd(fn, seg, disc, aux)
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fwd_bwd(fn, seg, disc, aux)
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def copy_bandwidth(device: str) -> float:
    """Device copy bandwidth in GB/s: read + write of a 1 GiB clone, median of 10."""
    x = torch.empty(2**28, dtype=torch.float32, device=device)
    samples = []
    for _ in range(12):
        sync(device)
        t0 = time.perf_counter()
        x.clone()
        sync(device)
        samples.append(time.perf_counter() - t0)
    return 2 * x.numel() * 4 / statistics.median(samples[2:]) / 1e9


def quantile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="default")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated subset of fp32,bf16")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default: 15 cpu, 100 cuda)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args()
    device = args.device
    rounds = args.rounds or (100 if device == "cuda" else 15)
    fns = providers(device, compile_reference=not args.no_compile)
    copy_gbs = copy_bandwidth(device) if device == "cuda" else None

    rows = []
    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} rounds={rounds}"
          + (f" copy_GB/s={copy_gbs:.0f}" if copy_gbs else ""))
    print(f"{'shape':>20} {'dtype':>5} {'provider':>9} {'median ms':>10} {'p20 ms':>8} {'p80 ms':>8} "
          f"{'GB/s':>7} {'x eager':>8}" + (f" {'of copy':>8}" if copy_gbs else ""))
    for entry in SHAPES[args.shapes]:
        shape, disc_hw, aux_hw = split(entry)
        for dtype_name in args.dtypes.split(","):
            dtype = DTYPES[dtype_name]
            g = torch.Generator().manual_seed(0)
            n = shape[0]
            seg = (torch.randn(shape, generator=g) * 3).to(device, dtype)
            disc = (torch.randn((n, 1, *disc_hw), generator=g) * 3).to(device, dtype).requires_grad_()
            aux = (torch.randn((n, 1, *aux_hw), generator=g) * 3).to(device, dtype)
            row_fns = dict(fns)
            if "ext" in fns and (disc_hw != tuple(shape[2:]) or aux_hw != tuple(shape[2:])):
                # The pre-fusion path: upsample both maps with F.interpolate, then the fused loss.
                row_fns["ext+up"] = lambda s, d, a: ops.weighted_adv_loss(
                    s, reference.upsample_to(d, s.shape[2:]), reference.upsample_to(a, s.shape[2:]),
                    label=1.0, backend="ext")
            times = time_providers(row_fns, seg, disc, aux, device, rounds, warmup=2)
            eager_median = statistics.median(times["eager"])
            for name, ts in times.items():
                median = statistics.median(ts)
                row = dict(shape=list(shape), disc_hw=list(disc_hw), aux_hw=list(aux_hw),
                           dtype=dtype_name, provider=name, device=device,
                           median_ms=median * 1e3, p20_ms=quantile(ts, 0.2) * 1e3,
                           p80_ms=quantile(ts, 0.8) * 1e3,
                           gb_per_s=minimal_bytes(shape, dtype, disc_hw, aux_hw) / median / 1e9,
                           speedup_vs_eager=eager_median / median)
                if copy_gbs:
                    row["fraction_of_copy"] = row["gb_per_s"] / copy_gbs
                rows.append(row)
                label = str(tuple(shape)) + ("" if disc_hw == tuple(shape[2:]) and aux_hw == disc_hw
                                             else f" D{disc_hw} Daux{aux_hw}")
                print(f"{label:>20} {dtype_name:>5} {name:>9} {row['median_ms']:>10.3f} "
                      f"{row['p20_ms']:>8.3f} {row['p80_ms']:>8.3f} {row['gb_per_s']:>7.2f} "
                      f"{row['speedup_vs_eager']:>8.2f}"
                      + (f" {row['fraction_of_copy']:>8.1%}" if copy_gbs else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"copy_gb_per_s": copy_gbs, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
