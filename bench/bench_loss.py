"""The fused loss's benchmark cases and providers: weighted_adv_loss forward and forward+backward.

The suite is bench/test_bench_loss.py (`make bench`, bench/gpu_check.sh); this module holds what it
times. Providers: eager = reference.py, compile = torch.compile(reference), ext / ext_v2 = the C++ or
CUDA ops, triton = the Triton kernel (CUDA only). Cases (SHAPES, the suite's --bench-shapes):
`production` is the call the training loop makes (docs/METHOD.md §1, paper presets: batch 2,
512x1024 crops): fp32 channels_last seg logits (2, 19, 512, 1024), D's map at its native 16x32,
upsampled inside the fused kernels, and D_aux's at image size (the eager and compiled references
upsample with F.interpolate); `bandwidth` the target shape 4x19x512x1024 with full-size maps and full
Cityscapes size; `host` (1x19x8x8) moves almost no data, so its wall time is each provider's host cost
per call. Minimal bytes: read seg, disc and aux once; for fwd+bwd also write dL/dz once, at disc's
size in disc's dtype. "fwd" is the loss call as training makes it (autograd recording, no backward);
the fused kernels compute dL/dz there already, so their backward is only the scaling.
"""

from __future__ import annotations

from typing import NamedTuple

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
    "production": [PRODUCTION],
    # The CPU suite (bench/test_bench_loss.py): BENCHMARKS.md's CPU shapes, then the training call.
    "cpu": [HOST, Case((1, 19, 128, 256)), Case((2, 19, 256, 512)), PRODUCTION],
    # The bandwidth target (4x19x512x1024 bf16, full-size maps) and full Cityscapes size.
    "bandwidth": [Case((4, 19, 512, 1024)), Case((4, 19, 1024, 2048), dtypes=("bf16",))],
    "gpu": [PRODUCTION, HOST, Case((4, 19, 512, 1024)), Case((4, 19, 1024, 2048), dtypes=("bf16",))],
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


def make_inputs(case: Case, dtype, device: str):
    g = torch.Generator().manual_seed(0)
    n, _, h, w = case.shape
    fmt = torch.channels_last if case.channels_last else torch.contiguous_format
    seg = (torch.randn(case.shape, generator=g) * 3).to(device, dtype).contiguous(memory_format=fmt)
    disc = (torch.randn((n, 1, *(case.disc_hw or (h, w))), generator=g) * 3).to(device, dtype)
    aux = (torch.randn((n, 1, *(case.aux_hw or (h, w))), generator=g) * 3).to(device, dtype)
    return seg, disc.requires_grad_(), aux


def case_calls(fns: dict, seg, disc, aux, keys) -> dict:
    """{(provider, mode): the zero-argument call timed} for every (provider, mode) of `keys`: "fwd" the
    loss call, "fwd+bwd" the call and its backward (disc's gradient cleared first)."""
    def fwd(fn):
        return lambda: fn(seg, disc, aux)

    def fwd_bwd(fn):
        def run():
            disc.grad = None
            fn(seg, disc, aux).backward()
        return run

    return {(name, mode): (fwd if mode == "fwd" else fwd_bwd)(fns[name]) for name, mode in keys}


def case_id(case: Case) -> str:
    """A short test id, e.g. "2x19x512x1024-cl-d16x32" (maps at full size are not named)."""
    text = "x".join(map(str, case.shape)) + ("-cl" if case.channels_last else "")
    for name, hw in (("d", case.disc_hw), ("daux", case.aux_hw)):
        if hw:
            text += f"-{name}{hw[0]}x{hw[1]}"
    return text


def group(case: Case, dtype_name: str, mode: str) -> str:
    """A comparison's label in the tables, e.g. "(4, 19, 512, 1024) bf16 fwd+bwd",
    "production: (2, 19, 512, 1024) channels_last, D 16x32, D_aux full size fp32 fwd"."""
    text = str(tuple(case.shape)) + (" channels_last" if case.channels_last else "")
    if case.disc_hw or case.aux_hw:
        text += "".join(f", {name} " + (f"{hw[0]}x{hw[1]}" if hw else "full size")
                        for name, hw in (("D", case.disc_hw), ("D_aux", case.aux_hw)))
    return ("production: " if case == PRODUCTION else "") + f"{text} {dtype_name} {mode}"
