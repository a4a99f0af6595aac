"""upsample_leaky_relu: leaky_relu(upsample(x)) in one pass, and its backward in two (docs/METHOD.md §1).

D_aux on image-size encodings runs its first 1x1 conv at feature size and upsamples only that conv's
output (models/discriminator.py); what is left at image size is this op, then 1x1 convs. In aten it is
three passes forward (interpolate, leaky ReLU read + write) and three backward (leaky ReLU's backward,
then an upsample backward that adds with atomics), the largest memory-bound glue of the paper step on an
H200 (BENCHMARKS.md). Here:

- forward: each program blends BLOCK_P output pixels x BLOCK_C channels from their 4 source pixels
  (aten's index and weight rule and its order of operations), applies the leaky ReLU in fp32 and writes
  the output once, in the input's memory format;
- backward: the adjoint of the upsampling along H, with leaky ReLU's derivative (read from the saved
  output, which has the input's sign) folded into the same read of the gradient, then along W
  (kernels/bilinear.py): each element summed by one lane in a fixed order, no atomics, the same bits on
  every run, accumulated in fp32.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from pwda_fast.kernels.bilinear import INTERPRET, source_index, upsample_adjoint, upsample_ratio

_BLOCK_P = 256 if INTERPRET else 64


@triton.jit(do_not_specialize=["P", "C", "H", "W", "h", "w", "x_sn", "x_sc", "x_sh", "x_sw",
                               "o_sn", "o_sc", "o_sh", "o_sw"])
def _upsample_leaky_relu_fwd_kernel(x_ptr, out_ptr, P, C, H, W, h, w, ratio_h, ratio_w, slope,
                                    x_sn, x_sc, x_sh, x_sw, o_sn, o_sc, o_sh, o_sw,
                                    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    q = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)  # flat (n, y, x)
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    mask = (q < P)[:, None] & (c < C)[None, :]
    n = q // (H * W)
    yy = (q // W) % H
    xx = q % W
    y0, y1, ly = source_index(yy, h, H, ratio_h)
    x0, x1, lx = source_index(xx, w, W, ratio_w)
    base = x_ptr + (n * x_sn)[:, None] + c[None, :] * x_sc
    v00 = tl.load(base + (y0 * x_sh + x0 * x_sw)[:, None], mask=mask, other=0.0).to(tl.float32)
    v01 = tl.load(base + (y0 * x_sh + x1 * x_sw)[:, None], mask=mask, other=0.0).to(tl.float32)
    v10 = tl.load(base + (y1 * x_sh + x0 * x_sw)[:, None], mask=mask, other=0.0).to(tl.float32)
    v11 = tl.load(base + (y1 * x_sh + x1 * x_sw)[:, None], mask=mask, other=0.0).to(tl.float32)
    # aten's upsample_bilinear2d order: h0 * (w0 * v00 + w1 * v01) + h1 * (w0 * v10 + w1 * v11).
    ly0, lx0 = (1.0 - ly)[:, None], (1.0 - lx)[:, None]
    ly1, lx1 = ly[:, None], lx[:, None]
    u = ly0 * (lx0 * v00 + lx1 * v01) + ly1 * (lx0 * v10 + lx1 * v11)
    out = tl.where(u > 0.0, u, u * slope)
    dst = out_ptr + (n * o_sn + yy * o_sh + xx * o_sw)[:, None] + c[None, :] * o_sc
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=mask)


def _device(t: torch.Tensor):
    """Triton launches on the current CUDA device, which need not be the tensor's one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if t.is_contiguous(memory_format=torch.channels_last) and not \
        t.is_contiguous() else torch.contiguous_format


def upsample_leaky_relu_fwd(x: torch.Tensor, size: tuple[int, int], slope: float) -> torch.Tensor:
    """x (N, C, h, w), any strides -> leaky_relu(upsample(x, size), slope) (N, C, *size), x's dtype,
    contiguous in x's memory format (channels_last stays channels_last)."""
    n, c, h, w = x.shape
    H, W = size
    out = torch.empty((n, c, H, W), dtype=x.dtype, device=x.device, memory_format=_memory_format(x))
    block_c = min(triton.next_power_of_2(c), 64)
    grid = (triton.cdiv(n * H * W, _BLOCK_P), triton.cdiv(c, block_c))
    with _device(x):
        _upsample_leaky_relu_fwd_kernel[grid](
            x, out, n * H * W, c, H, W, h, w, upsample_ratio(h, H), upsample_ratio(w, W), float(slope),
            *x.stride(), *out.stride(), BLOCK_P=_BLOCK_P, BLOCK_C=block_c)
    return out


def upsample_leaky_relu_bwd(grad: torch.Tensor, out: torch.Tensor, in_hw: tuple[int, int],
                            slope: float, dtype: torch.dtype) -> torch.Tensor:
    """grad and out (N, C, H, W) -> the gradient w.r.t. x (N, C, *in_hw) in `dtype`, in out's memory
    format: rows (H -> h) with leaky ReLU's derivative folded in, then columns (W -> w), in fp32."""
    n, c, H, W = out.shape
    h, w = in_hw
    fmt = _memory_format(out)
    grad = grad.contiguous(memory_format=fmt)
    with _device(out):
        if fmt == torch.channels_last:  # memory (N, H, W, C): rows have inner W * C, columns inner C
            rows = upsample_adjoint(grad, n, H, h, W * c, gate=out, slope=slope)  # (N, h, W * C)
            cols = upsample_adjoint(rows, n * h, W, w, c)  # (N * h, w, C)
            result = cols.view(n, h, w, c).permute(0, 3, 1, 2)
        else:  # memory (N, C, H, W)
            rows = upsample_adjoint(grad, n * c, H, h, W, gate=out, slope=slope)  # (N * C, h, W)
            cols = upsample_adjoint(rows, n * c * h, W, w, 1)  # (N * C * h, w, 1)
            result = cols.view(n, c, h, w)
    return result.to(dtype)
