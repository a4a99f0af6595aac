"""Forward and forward+backward time of weighted_adv_loss: eager reference, torch.compile, ext, triton.

    python bench/bench_loss.py --device cpu [--shapes tiny|small|default|full|lowres|production|gpu]
                               [--json FILE]

Providers run interleaved (each provider's calls once per round), so a busy machine slows them alike.
Each sample is `--calls` back-to-back calls timed together on the host, ending with a device sync:
the wall time a caller waits, host and device together (bench/common.time_calls). On CUDA each
(provider, mode) is then profiled once over `--calls` calls for its device time (the sum of its
kernels' durations) and its device operations per call: a call whose wall time is several times its
device time is host-bound. The table gives the wall median and p20/p80 over rounds (bench/common.py's
quantile rule), the device time, and the achieved bandwidth from the minimal byte count over the
device time (the wall time on CPU) with its fraction of the measured copy bandwidth. Minimal bytes:
read seg, disc and aux once; for fwd+bwd also write dL/dz once, at disc's size in disc's dtype. "fwd"
is the loss call as training makes it (autograd recording, no backward); the fused kernels compute
dL/dz there already, so their backward is only the scaling. The `host` case (1x19x8x8) moves almost
no data: its wall time is the per-call host cost of each provider (checks, dispatch, autograd).

`--shapes production` is the call the training loop makes (docs/METHOD.md §1, paper presets: batch 2,
512x1024 crops): fp32 channels_last seg logits (2, 19, 512, 1024), D's map at its native 16x32,
upsampled inside the fused kernels, and D_aux's at image size; the eager and compiled references
upsample with F.interpolate. `--shapes gpu` runs it first, then the `bandwidth` rows (full-size
maps). `lowres` adds "ext+up" (F.interpolate both maps, then ext: the path before in-kernel
upsampling). The JSON is rewritten after every case, so a run cut short keeps the rows it finished.

`make bench` times the same providers and cases as a pytest-benchmark suite (bench/test_bench_loss.py,
built on this module's cases, providers and timing); this script remains the entry point of
bench/gpu_check.sh, whose table (bench/gpu_summary.py) reads its JSON, and of the lowres comparison.
"""

from __future__ import annotations

import argparse
import json
from typing import NamedTuple

import common
import torch

from pwda_fast import ops, reference


class Case(NamedTuple):
    shape: tuple  # seg logits (N, C, H, W)
    disc_hw: tuple | None = None  # D map (h, w); None: full size
    aux_hw: tuple | None = None  # D_aux map (h, w); None: full size
    channels_last: bool = False
    dtypes: tuple | None = None  # None: --dtypes


# The paper presets: batch 2, D's map at 16x32, D_aux's at image size (adapt.aux_at = "image").
PRODUCTION = Case((2, 19, 512, 1024), (16, 32), None, channels_last=True, dtypes=("fp32",))
# Next to no data: the wall time per call is the host's cost of the call.
HOST = Case((1, 19, 8, 8), dtypes=("fp32",))
SHAPES = {
    "host": [HOST],
    "tiny": [Case((1, 19, 16, 32)),  # gpu_check.sh --cpu-dry-run: also a tiny production-like call
             Case((1, 19, 16, 32), (2, 4), (3, 5), channels_last=True, dtypes=("fp32",))],
    "small": [Case((1, 19, 64, 128)), Case((2, 19, 256, 512))],
    "default": [Case((1, 19, 128, 256)), Case((2, 19, 256, 512))],
    "full": [Case((1, 19, 128, 256)), Case((2, 19, 256, 512)), Case((4, 19, 512, 1024))],
    "production": [PRODUCTION],
    # The CPU suite (bench/test_bench_loss.py): BENCHMARKS.md's CPU shapes, then the training call.
    "cpu": [HOST, Case((1, 19, 128, 256)), Case((2, 19, 256, 512)), PRODUCTION],
    # The bandwidth target (4x19x512x1024 bf16, full-size maps) and full Cityscapes size.
    "bandwidth": [Case((4, 19, 512, 1024)), Case((4, 19, 1024, 2048), dtypes=("bf16",))],
    "gpu": [PRODUCTION, HOST, Case((4, 19, 512, 1024)), Case((4, 19, 1024, 2048), dtypes=("bf16",))],
    "lowres": [Case((4, 19, 512, 1024), (16, 32), (65, 129)), Case((4, 19, 512, 1024))],
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = ("fwd", "fwd+bwd")


def minimal_bytes(case: Case, dtype, mode: str) -> int:
    """Bytes a one-pass kernel must move: seg (C values per pixel) and both maps in; dL/dz out (fwd+bwd)."""
    n, c, h, w = case.shape
    size = torch.empty((), dtype=dtype).element_size()
    disc = n * (case.disc_hw or (h, w))[0] * (case.disc_hw or (h, w))[1]
    aux = n * (case.aux_hw or (h, w))[0] * (case.aux_hw or (h, w))[1]
    return (n * c * h * w + disc + aux + (disc if mode == "fwd+bwd" else 0)) * size


PROVIDERS = ("eager", "compile", "ext", "ext_v2", "triton")


def provider_problem(name: str, device: str) -> str | None:
    """Why provider `name` (PROVIDERS) cannot be timed on `device`, or None when it can."""
    if name in ("eager", "compile"):
        return None
    if name == "triton" and device != "cuda":
        return ("Triton on CPU runs in its interpreter (TRITON_INTERPRET=1): a correctness tool, "
                "not a benchmark; run on a CUDA device to time it")
    return ops.LOSS.problem(name, device)


def provider(name: str):
    """f(seg, disc, aux) -> the loss with label 1 and the paper's T, floor, mu, computed by `name`:
    eager = reference.py, compile = torch.compile of it (inductor, dynamic=False), ext / triton =
    the fused op through ops."""
    if name == "eager":
        return lambda s, d, a: reference.weighted_adv_loss(s, d, a, label=1.0)
    if name == "compile":
        compiled = torch.compile(reference.weighted_adv_loss, dynamic=False)
        return lambda s, d, a: compiled(s, d, a, label=1.0)
    return lambda s, d, a: ops.weighted_adv_loss(s, d, a, label=1.0, backend=name)


def providers(device: str, compile_reference: bool) -> dict:
    """name -> provider(name), for every provider that can run on `device`."""
    return {name: provider(name) for name in PROVIDERS
            if (compile_reference or name != "compile") and provider_problem(name, device) is None}


def make_inputs(case: Case, dtype, device: str):
    g = torch.Generator().manual_seed(0)
    n, _, h, w = case.shape
    fmt = torch.channels_last if case.channels_last else torch.contiguous_format
    seg = (torch.randn(case.shape, generator=g) * 3).to(device, dtype).contiguous(memory_format=fmt)
    disc = (torch.randn((n, 1, *(case.disc_hw or (h, w))), generator=g) * 3).to(device, dtype)
    aux = (torch.randn((n, 1, *(case.aux_hw or (h, w))), generator=g) * 3).to(device, dtype)
    return seg, disc.requires_grad_(), aux


def time_case(fns: dict, seg, disc, aux, device: str, rounds: int, calls: int, warmup: int,
              keys=None, errors: dict | None = None) -> dict:
    """-> ({(provider, mode): wall seconds per call, one sample per round}, {(provider, mode): the
    zero-argument call timed}), every (provider, mode) of `keys` (default: all of fns x MODES)
    interleaved in each round (common.interleave)."""
    def fwd(fn):
        return lambda: fn(seg, disc, aux)

    def fwd_bwd(fn):
        def run():
            disc.grad = None
            fn(seg, disc, aux).backward()
        return run

    keys = keys or [(name, mode) for name in fns for mode in MODES]
    calls_of = {(name, mode): (fwd if mode == "fwd" else fwd_bwd)(fns[name]) for name, mode in keys}
    times = common.interleave(calls_of, device, rounds, warmup, calls_per_sample=calls, errors=errors)
    return times, calls_of


def case_id(case: Case) -> str:
    """A short test id, e.g. "2x19x512x1024-cl-d16x32" (maps at full size are not named)."""
    text = "x".join(map(str, case.shape)) + ("-cl" if case.channels_last else "")
    for name, hw in (("d", case.disc_hw), ("daux", case.aux_hw)):
        if hw:
            text += f"-{name}{hw[0]}x{hw[1]}"
    return text


def label_of(case: Case) -> str:
    text = str(tuple(case.shape)) + (" CL" if case.channels_last else "")
    if case.disc_hw or case.aux_hw:
        text += f" D{case.disc_hw or 'full'} Daux{case.aux_hw or 'full'}"
    return text


def case_fields(case: Case, dtype_name: str, name: str, mode: str, device: str) -> dict:
    """What names a row: the case, dtype, mode and provider."""
    return dict(shape=list(case.shape), disc_hw=list(case.disc_hw or case.shape[2:]),
                aux_hw=list(case.aux_hw or case.shape[2:]), channels_last=case.channels_last,
                production=case == PRODUCTION, host=case == HOST, dtype=dtype_name, mode=mode, provider=name,
                device=device)


def make_row(case: Case, dtype_name: str, name: str, mode: str, samples, eager_samples, dev, device: str,
             copy_gbs: float, graph=(None, None)) -> dict:
    """One JSON row: wall spread from the samples, device time and operations when measured (`dev`:
    common.device_time's pair or None), the graph-replay device time (`graph`: common.graph_time's
    pair), bandwidth from the device time (else the wall median)."""
    st = common.spread(samples)
    dev_s, dev_ops = dev if dev else (None, None)
    gbs = minimal_bytes(case, DTYPES[dtype_name], mode) / (dev_s or st["median"]) / 1e9
    eager = common.spread(eager_samples)["median"] if eager_samples else None
    return dict(case_fields(case, dtype_name, name, mode, device),
                median_ms=st["median"] * 1e3, p20_ms=st["p20"] * 1e3, p80_ms=st["p80"] * 1e3,
                device_ms=None if dev_s is None else dev_s * 1e3, device_ops_per_call=dev_ops, gb_per_s=gbs,
                graph_ms=None if graph[0] is None else graph[0] * 1e3, graph_error=graph[1],
                speedup_vs_eager=eager / st["median"] if eager else None, fraction_of_copy=gbs / copy_gbs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="default")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated subset of fp32,bf16")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default: 15 cpu, 20 cuda)")
    parser.add_argument("--calls", type=int, default=None,
                        help="back-to-back calls per timed sample (default: 1 cpu, 20 cuda)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (CPU; 1 is steadier on a shared machine)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON (after every case)")
    args = parser.parse_args()
    device = args.device
    cuda = device == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = args.rounds or (20 if cuda else 15)
    calls = args.calls or (20 if cuda else 1)
    fns = providers(device, compile_reference=not args.no_compile)
    copy_gbs = common.copy_bandwidth(device)
    result = {"device": device, "machine": common.machine(device), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "rounds": rounds, "calls": calls,
              "copy_gb_per_s": copy_gbs, "rows": []}

    print(f"device={device} ({result['machine']}) torch={torch.__version__} rounds={rounds} "
          f"calls/sample={calls} copy_GB/s={copy_gbs:.1f}")
    print(f"{'case':>42} {'dtype':>5} {'mode':>7} {'provider':>9} {'wall ms':>9} {'p20 ms':>8} "
          f"{'p80 ms':>8} {'dev ms':>8} {'ops':>5} {'GB/s':>7} {'x eager':>8} {'of copy':>8}")
    for case in SHAPES[args.shapes]:
        for dtype_name in case.dtypes or args.dtypes.split(","):
            dtype = DTYPES[dtype_name]
            seg, disc, aux = make_inputs(case, dtype, device)
            case_fns = dict(fns)
            if "ext" in fns and args.shapes == "lowres" and (case.disc_hw or case.aux_hw):
                case_fns["ext+up"] = lambda s, d, a: ops.weighted_adv_loss(
                    s, reference.upsample_to(d, s.shape[2:]), reference.upsample_to(a, s.shape[2:]),
                    label=1.0, backend="ext")
            errors = {}
            times, calls_of = time_case(case_fns, seg, disc, aux, device, rounds, calls, warmup=2,
                                        errors=errors)
            for (name, mode), ts in times.items():
                if not ts:
                    continue
                dev = common.device_time(calls_of[(name, mode)], device, calls)
                graph = common.graph_time(calls_of[(name, mode)], device, calls)
                row = make_row(case, dtype_name, name, mode, ts, times.get(("eager", mode)), dev, device,
                               copy_gbs, graph)
                result["rows"].append(row)
                dev_text = f"{row['device_ms']:>8.3f} {dev[1]:>5.1f}" if dev else f"{'-':>8} {'-':>5}"
                graph_text = f" graph {row['graph_ms']:.3f} ms" if row["graph_ms"] else ""
                print(f"{label_of(case):>42} {dtype_name:>5} {mode:>7} {name:>9} {row['median_ms']:>9.3f} "
                      f"{row['p20_ms']:>8.3f} {row['p80_ms']:>8.3f} {dev_text} {row['gb_per_s']:>7.2f} "
                      f"{row['speedup_vs_eager'] or 0:>8.2f} {row['fraction_of_copy']:>8.1%}{graph_text}"
                      + (f" (graph capture failed: {graph[1]})" if graph[1] else ""), flush=True)
            for (name, mode), error in errors.items():
                result["rows"].append(dict(case_fields(case, dtype_name, name, mode, device), error=error))
                print(f"{label_of(case):>42} {dtype_name:>5} {mode:>7} {name:>9} FAILED: {error}", flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
