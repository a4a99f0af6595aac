"""D_aux's image-size leaky_relu(upsample(.)) as one op.

    ops.upsample_leaky_relu(x, size, *, slope=0.2, backend="auto")                -> (N, C, *size)

Backends (UPSAMPLE, chosen by kernels.upsample): "torch" (reference.py) and "triton"
(kernels/upsample_leaky_relu.py: one pass forward, two backward). "auto" is "triton" on CUDA where it
can run, else "torch".
"""

from __future__ import annotations

import torch

from pwda_fast import reference
from pwda_fast.ops.backends import OpBackends, register, triton_problem
from pwda_fast.ops.loss import _FLOAT_DTYPES

UPSAMPLE = register(OpBackends(
    op="upsample_leaky_relu", key="upsample", what="D_aux's fused upsample + leaky ReLU",
    problems={"triton": triton_problem("upsample_leaky_relu")}, auto={"cuda": ("triton",)}))


def _upsampled_like(x: torch.Tensor, n: int, c: int, h: int, w: int) -> torch.Tensor:
    """An empty (n, c, h, w) tensor of x's dtype and device, channels_last when x is (as the kernels
    write it)."""
    out = x.new_empty((n, c, h, w))
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


@torch.library.custom_op("pwda_fast::upsample_leaky_relu_triton", mutates_args=())
def _upsample_leaky_relu_triton(x: torch.Tensor, height: int, width: int, slope: float) -> torch.Tensor:
    from pwda_fast.kernels.upsample_leaky_relu import upsample_leaky_relu_fwd
    return upsample_leaky_relu_fwd(x, (height, width), slope)


@_upsample_leaky_relu_triton.register_fake
def _(x, height, width, slope):
    return _upsampled_like(x, x.shape[0], x.shape[1], height, width)


@torch.library.custom_op("pwda_fast::upsample_leaky_relu_triton_backward", mutates_args=())
def _upsample_leaky_relu_triton_backward(grad: torch.Tensor, out: torch.Tensor, in_height: int,
                                         in_width: int, slope: float) -> torch.Tensor:
    from pwda_fast.kernels.upsample_leaky_relu import upsample_leaky_relu_bwd
    return upsample_leaky_relu_bwd(grad, out, (in_height, in_width), slope, out.dtype)


@_upsample_leaky_relu_triton_backward.register_fake
def _(grad, out, in_height, in_width, slope):
    return _upsampled_like(out, out.shape[0], out.shape[1], in_height, in_width)


def _upsample_setup_context(ctx, inputs, output):
    x, _, _, slope = inputs
    ctx.save_for_backward(output)
    ctx.in_hw, ctx.slope = tuple(x.shape[2:]), slope


def _upsample_backward(ctx, grad):
    (out,) = ctx.saved_tensors
    return _upsample_leaky_relu_triton_backward(grad, out, *ctx.in_hw, ctx.slope), None, None, None


_upsample_leaky_relu_triton.register_autograd(_upsample_backward, setup_context=_upsample_setup_context)


def upsample_leaky_relu(x: torch.Tensor, size, *, slope: float = 0.2, backend: str = "auto") -> torch.Tensor:
    """leaky_relu(upsample(x, size), slope), bilinear with align_corners=True, differentiable in x.

    x (N, C, h, w) float32 / bfloat16 / float16 -> (N, C, H, W) in x's dtype, H >= h, W >= w; the
    Triton backend writes channels_last output for channels_last x and computes in fp32.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or min(x.shape) == 0:
        raise ValueError(f"x must be a non-empty (N, C, h, w) tensor; got {getattr(x, 'shape', type(x))}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be float32, bfloat16 or float16; got {x.dtype}")
    height, width = (int(v) for v in size)
    if height < x.shape[2] or width < x.shape[3]:
        raise ValueError(f"size must be at least x's (h, w) = {tuple(x.shape[2:])} (an upsampling); "
                         f"got {(height, width)}")
    if UPSAMPLE.resolve(backend, x.device) == "torch":
        return reference.upsample_leaky_relu(x, (height, width), slope)
    return _upsample_leaky_relu_triton(x, height, width, float(slope))
