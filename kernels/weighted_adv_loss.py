"""weighted_adv_loss: the fused one-pass weighted adversarial loss (docs/METHOD.md §1) in Triton.

Each program reads BLOCK pixels' C seg logits once (online max and sum-exp), forms the weight
w = (d + mu) * sigmoid(a), the stable BCE of the discriminator logit, writes dL/dz and stores one
partial sum of w * bce; the partials are then added in a fixed order, so the loss is deterministic.
disc and aux may be (N, 1, h, w) with h <= H, w <= W: each pixel's z and a are then sampled bilinearly
(align_corners=True, aten's index and weight rule) from the low-res map, never materialised at (H, W),
and the gradient is folded back onto the low-res map by _upsample_adjoint_kernel (columns, then rows),
each element summed by one lane in a fixed order: no atomics, the same bits on every run.

Sizes are not specialised on (do_not_specialize): Triton would otherwise compile a new variant whenever
a size's "== 1" or "divisible by 16" property changes (78 compiles across the GPU tests before), and
the flat-index divisions they feed cannot be vectorised anyway. seg's channel and column strides keep
only the "== 1" specialisation: it tells NCHW (stride 1 along W) from channels_last (along C), one
compiled variant each per dtype and set of maps.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl
from pwda_fast.kernels.bilinear import source_index, upsample_adjoint, upsample_ratio

# The interpreter (TRITON_INTERPRET=1, CPU tensors) costs ~6 ms per program and cannot autotune ("0
# active drivers"): few, large programs and one config. On a GPU 1024 pixels per program keeps each
# thread on 4-8 pixels and the partial-sum buffer at P / 1024 floats.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_BLOCK = 4096 if _INTERPRET else 1024


@triton.jit
def _sample(ptr, n, h, w, sn, sh, sw, in_h, in_w, H, W, ratio_h, ratio_w, mask, UP: tl.constexpr):
    """A (N, 1, in_h, in_w) map's value at output pixels (n, h, w) of the (H, W) grid, as fp32."""
    base = ptr + n * sn
    if UP:
        y0, y1, ly = source_index(h, in_h, H, ratio_h)
        x0, x1, lx = source_index(w, in_w, W, ratio_w)
        v00 = tl.load(base + y0 * sh + x0 * sw, mask=mask, other=0.0).to(tl.float32)
        v01 = tl.load(base + y0 * sh + x1 * sw, mask=mask, other=0.0).to(tl.float32)
        v10 = tl.load(base + y1 * sh + x0 * sw, mask=mask, other=0.0).to(tl.float32)
        v11 = tl.load(base + y1 * sh + x1 * sw, mask=mask, other=0.0).to(tl.float32)
        kx0 = 1.0 - lx
        return (1.0 - ly) * (kx0 * v00 + lx * v01) + ly * (kx0 * v10 + lx * v11)
    else:
        return tl.load(base + h * sh + w * sw, mask=mask, other=0.0).to(tl.float32)


# Sizes and the maps' strides: see the module docstring.
_SIZE_ARGS = ["P", "C", "H", "W", "seg_sn", "seg_sh", "disc_sn", "disc_sh", "disc_sw", "disc_h", "disc_w",
              "aux_sn", "aux_sh", "aux_sw", "aux_h", "aux_w"]


@triton.jit(do_not_specialize=_SIZE_ARGS, do_not_specialize_on_alignment=["seg_sc", "seg_sw"])
def _weighted_adv_loss_fwd_kernel(seg_ptr, disc_ptr, aux_ptr, grad_ptr, partial_ptr,
                                  P, C, H, W,
                                  seg_sn, seg_sc, seg_sh, seg_sw,
                                  disc_sn, disc_sh, disc_sw, disc_h, disc_w, disc_rh, disc_rw,
                                  aux_sn, aux_sh, aux_sw, aux_h, aux_w, aux_rh, aux_rw,
                                  label, threshold, floor, mu, inv_count,
                                  HAS_AUX: tl.constexpr, UP_DISC: tl.constexpr, UP_AUX: tl.constexpr,
                                  INDEX_64: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if INDEX_64:
        q = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)  # flat pixel index (n, h, w)
    else:
        # Every element offset fits in int32 (the launcher checked): 32-bit divisions and offset maths,
        # a handful of instructions each where a 64-bit division is an emulated ~70-instruction routine.
        q = pid * BLOCK + tl.arange(0, BLOCK)
    mask = q < P
    hw = H * W
    n = q // hw
    h = (q - n * hw) // W
    w = q - n * hw - h * W

    # Pointer increments (not c * seg_sc) keep the channel offset 64-bit for any stride.
    x_ptr = seg_ptr + n * seg_sn + h * seg_sh + w * seg_sw
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    for _ in range(0, C):
        v = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
        m_new = tl.maximum(m, v)
        s = s * tl.exp(m - m_new) + tl.exp(v - m_new)
        m = m_new
        x_ptr += seg_sc
    p_max = 1.0 / s  # s >= 1 (the max term is exp(0)), so p* <= 1

    weight = tl.where(p_max > threshold, floor, tl.exp(-p_max)) + mu
    if HAS_AUX:
        a = _sample(aux_ptr, n, h, w, aux_sn, aux_sh, aux_sw, aux_h, aux_w, H, W, aux_rh, aux_rw, mask,
                    UP_AUX)
        ea = tl.exp(-tl.abs(a))
        weight = weight * tl.where(a >= 0.0, 1.0, ea) / (1.0 + ea)

    z = _sample(disc_ptr, n, h, w, disc_sn, disc_sh, disc_sw, disc_h, disc_w, H, W, disc_rh, disc_rw, mask,
                UP_DISC)
    ez = tl.exp(-tl.abs(z))  # in (0, 1]: finite for |z| up to 1e4 and beyond
    # log1p(ez) without a log1p intrinsic: log(u) * ez / (u - 1) cancels the rounding of u = 1 + ez.
    u = 1.0 + ez
    du = u - 1.0
    log1p_ez = tl.where(du == 0.0, ez, tl.log(u) * (ez / tl.where(du == 0.0, 1.0, du)))
    bce = tl.maximum(z, 0.0) - z * label + log1p_ez
    # sigmoid(z) - y without cancellation: with s = 1 - 2y (+1 or -1) it is s * sigmoid(s * z), i.e.
    # -sigmoid(-z) for y = 1 (sigmoid(z) - 1 is 0 in fp32 for z > 17, where it is -exp(-z)).
    sign = 1.0 - 2.0 * label
    sig_sz = tl.where(sign * z >= 0.0, 1.0, ez) / u
    tl.store(grad_ptr + q, weight * (sign * sig_sz) * inv_count, mask=mask)
    tl.store(partial_ptr + pid, tl.sum(tl.where(mask, weight * bce, 0.0), axis=0))


# BLOCK stays fixed (not tuned) so the number of partial sums does not depend on the chosen config. The
# key is what changes the best warp count: work per pixel (C), layout (seg_sw: 1 for NCHW, C for
# channels_last) and which maps are read and interpolated; the dtypes are added by triton.
_weighted_adv_loss_fwd = _weighted_adv_loss_fwd_kernel if _INTERPRET else triton.autotune(
    configs=[triton.Config({}, num_warps=w) for w in (2, 4, 8)],
    key=["C", "seg_sw", "HAS_AUX", "UP_DISC", "UP_AUX"],
)(_weighted_adv_loss_fwd_kernel)


# Offsets below this use the kernel's 32-bit index path (a constant so a test can force the 64-bit one).
_INT32_LIMIT = 2**31


def _max_offset(t: torch.Tensor) -> int:
    """The largest element offset of t from its data pointer."""
    return sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))


def weighted_adv_loss_fwd(seg_logits: torch.Tensor, disc_logits: torch.Tensor,
                          aux_logits: torch.Tensor | None, label: float, threshold: float,
                          floor: float, mu: float) -> tuple[torch.Tensor, torch.Tensor]:
    """seg_logits (N, C, H, W); disc_logits, aux_logits (N, 1, h, w) with h <= H, w <= W, any strides ->
    (loss () fp32, grad_disc fp32 of disc's shape = dL/dz for an upstream gradient of 1)."""
    n, c, h, w = seg_logits.shape
    pixels = n * h * w
    programs = triton.cdiv(pixels, _BLOCK)
    grad = torch.empty((n, 1, h, w), dtype=torch.float32, device=seg_logits.device)
    partial = torch.empty(programs, dtype=torch.float32, device=seg_logits.device)
    aux = disc_logits if aux_logits is None else aux_logits  # any valid pointer; unread without aux

    # Triton launches on the current CUDA device, which need not be the tensors' one.
    with torch.cuda.device(seg_logits.device) if seg_logits.is_cuda else contextlib.nullcontext():
        _weighted_adv_loss_fwd[(programs,)](
            seg_logits, disc_logits, aux, grad, partial,
            pixels, c, h, w,
            *seg_logits.stride(),
            disc_logits.stride(0), disc_logits.stride(2), disc_logits.stride(3),
            disc_logits.shape[2], disc_logits.shape[3],
            upsample_ratio(disc_logits.shape[2], h), upsample_ratio(disc_logits.shape[3], w),
            aux.stride(0), aux.stride(2), aux.stride(3), aux.shape[2], aux.shape[3],
            upsample_ratio(aux.shape[2], h), upsample_ratio(aux.shape[3], w),
            float(label), float(threshold), float(floor), float(mu), 1.0 / pixels,
            HAS_AUX=aux_logits is not None, UP_DISC=tuple(disc_logits.shape[2:]) != (h, w),
            UP_AUX=tuple(aux.shape[2:]) != (h, w),
            INDEX_64=max(pixels, *(_max_offset(t) for t in (seg_logits, disc_logits, aux))) >= _INT32_LIMIT,
            BLOCK=_BLOCK,
        )
        dh, dw = disc_logits.shape[2:]
        if (dh, dw) != (h, w):  # fold the per-pixel gradient onto the low-res map: columns, then rows
            cols = upsample_adjoint(grad, n * h, w, dw, 1)
            grad = upsample_adjoint(cols, n, h, dh, dw).view(n, 1, dh, dw)
    loss = (partial.sum(dtype=torch.float64) / pixels).to(torch.float32)
    return loss, grad
