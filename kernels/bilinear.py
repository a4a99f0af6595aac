"""Bilinear upsampling (align_corners=True) pieces shared by the Triton kernels: aten's source index
rule, and the adjoint of upsampling along one axis in a fixed order (no atomics, the same bits on every
run), optionally gated by a leaky ReLU's slope (the backward of leaky_relu(upsample(x))).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

# The interpreter (TRITON_INTERPRET=1, CPU tensors) costs ~6 ms per program: few, large programs there.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_BLOCK = 4096 if INTERPRET else 1024


@triton.jit
def source_index(x, size_in, size_out, ratio):
    """aten's align_corners=True source index along one axis: (i0, i1, lambda1); equal sizes: identity."""
    src = ratio * x.to(tl.float32)
    i0 = tl.minimum(src.to(tl.int64), size_in - 1)  # src >= 0: truncation is floor
    l1 = tl.minimum(tl.maximum(src - i0.to(tl.float32), 0.0), 1.0)
    i1 = i0 + tl.where(i0 < size_in - 1, 1, 0)
    same = size_in == size_out
    return tl.where(same, x, i0), tl.where(same, x, i1), tl.where(same, 0.0, l1)


@triton.jit(do_not_specialize=["total", "size_out", "size_in", "inner", "trips"])
def _upsample_adjoint_kernel(src_ptr, gate_ptr, dst_ptr, total, size_out, size_in, inner, ratio, trips, slope,
                             GATED: tl.constexpr, BLOCK: tl.constexpr):
    """dst (outer, size_in, inner) fp32 = the adjoint of the align_corners=True upsampling size_in ->
    size_out along the middle axis of src (outer, size_out, inner), both contiguous: each lane owns one
    dst element and adds src[o, x, k] * its tap weight for x upward from just before its first tap,
    `trips` steps in all. GATED: src[o, x, k] is first multiplied by 1 where gate[o, x, k] > 0, else by
    `slope` (leaky ReLU's derivative read from its output, which has its input's sign)."""
    t = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = t < total
    k = t % inner
    j = (t // inner) % size_in
    o = t // (inner * size_in)
    # The first x with i0(x) >= j - 1 is about (j - 1) / ratio; 2 less absorbs the float rounding.
    guess = ((j - 1).to(tl.float32) / tl.where(ratio > 0.0, ratio, 1.0)).to(tl.int64) - 2
    x = tl.where((j > 1) & (ratio > 0.0), tl.maximum(guess, 0), 0)
    offset = o * size_out * inner + k
    acc = tl.zeros([BLOCK], tl.float32)
    for _ in range(0, trips):
        i0, i1, l1 = source_index(x, size_in, size_out, ratio)
        w = tl.where(i0 == j, 1.0 - l1, 0.0) + tl.where(i1 == j, l1, 0.0)
        live = mask & (x < size_out) & (w != 0.0)
        v = tl.load(src_ptr + offset + x * inner, mask=live, other=0.0).to(tl.float32)
        if GATED:
            gate = tl.load(gate_ptr + offset + x * inner, mask=live, other=0.0).to(tl.float32)
            v = tl.where(gate > 0.0, v, v * slope)
        acc += w * v
        x += 1
    tl.store(dst_ptr + t, acc, mask=mask)


def upsample_ratio(size_in: int, size_out: int) -> float:
    """align_corners=True: (in - 1) / (out - 1), 0 for a 1-pixel output. One definition for the
    sampling and its adjoint, so both see the same fp32 ratio and the same taps."""
    return (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0


def upsample_adjoint(src: torch.Tensor, outer: int, size_out: int, size_in: int, inner: int,
                     gate: torch.Tensor | None = None, slope: float = 1.0) -> torch.Tensor:
    """(outer, size_out, inner) contiguous -> (outer, size_in, inner) fp32: the adjoint of size_in ->
    size_out, applied to src, or to src gated by leaky ReLU's derivative at `gate` (same layout)."""
    if size_in == size_out and gate is None:
        return src.float()
    dst = torch.empty((outer, size_in, inner), dtype=torch.float32, device=src.device)
    ratio = upsample_ratio(size_in, size_out)
    # A bin's taps span about 2 / ratio outputs; 6 more cover the start guess and the float rounding.
    trips = math.ceil(2.0 / ratio) + 6 if ratio > 0.0 else size_out
    total = outer * size_in * inner
    _upsample_adjoint_kernel[(triton.cdiv(total, _BLOCK),)](
        src, src if gate is None else gate, dst, total, size_out, size_in, inner, ratio, trips, float(slope),
        GATED=gate is not None, BLOCK=_BLOCK)
    return dst
