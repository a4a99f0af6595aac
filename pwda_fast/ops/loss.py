"""The weighted adversarial loss (eq. 7 with the weights of eqs. 3-6) and its pixel weights.

    ops.weighted_adv_loss(seg_logits, disc_logits, aux_logits=None, *, label, threshold, floor, mu,
                          backend="auto")                                          -> () fp32
    ops.pixel_weights(seg_logits, aux_logits=None, *, threshold, floor, mu)       -> (N, H, W) fp32

Backends (LOSS, chosen by kernels.loss): "torch" (reference.py), "ext" (torch.ops.pwda_fast from
csrc/, C++ autograd), "ext_v2" (the second CUDA kernel, csrc/cuda/weighted_adv_loss_v2.cu: CUDA only,
opt-in until a GPU run has shown it correct and faster), "triton" (kernels/weighted_adv_loss.py, a
Python custom op; on CPU only with TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch

from pwda_fast import reference
from pwda_fast.ops.backends import OpBackends, ext_problem, register, triton_problem

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

LOSS = register(OpBackends(
    op="weighted_adv_loss", key="loss", what="the fused weighted adversarial loss",
    problems={"ext": ext_problem("ext", "weighted_adv_loss_fwd"),
              "ext_v2": ext_problem("ext_v2", "weighted_adv_loss_v2_fwd", devices=("cuda",)),
              "triton": triton_problem("weighted_adv_loss")},
    # ext first on CUDA too: on an H200 (BENCHMARKS.md, 2026-12-04) its fwd+bwd kernels take 141 us
    # against Triton's 167 us at 4x19x512x1024 bf16, and its autograd is C++. ext_v2 is never "auto"
    # until a GPU run has shown it correct and faster.
    auto={"cuda": ("ext", "triton"), "cpu": ("ext",)}))


def _check_logits(name: str, t: torch.Tensor, like: torch.Tensor | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16; got {t.dtype}")
    if like is None:
        if t.dim() != 4 or min(t.shape) == 0:
            raise ValueError(f"{name} must be a non-empty (N, C, H, W) tensor; got {tuple(t.shape)}")
        return
    n, _, h, w = like.shape
    shape = t.shape
    if len(shape) != 4 or shape[0] != n or shape[1] != 1 or not 1 <= shape[2] <= h or not 1 <= shape[3] <= w:
        raise ValueError(f"{name} must be (N, 1, H, W) like seg_logits {tuple(like.shape)}, or a "
                         f"lower-resolution (N, 1, h, w) with 1 <= h <= H, 1 <= w <= W, i.e. "
                         f"({n}, 1, <={h}, <={w}); got {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} must be on seg_logits' device {like.device}; got {t.device}")


def check_inputs(seg_logits, disc_logits=None, aux_logits=None, label=None,
                 threshold: float = 0.9, floor: float = 0.01, mu: float = 0.1) -> None:
    """Boundary checks shared by every backend; each message names the tensor and the rule."""
    _check_logits("seg_logits", seg_logits)
    if disc_logits is not None:
        _check_logits("disc_logits", disc_logits, like=seg_logits)
    if aux_logits is not None:
        _check_logits("aux_logits", aux_logits, like=seg_logits)
    if label is not None and float(label) not in (0.0, 1.0):
        raise ValueError(f"label must be 0.0 (source) or 1.0 (target); got {label}")
    if not 0.0 < threshold:
        raise ValueError(f"threshold must be > 0 (>= 1 turns the floor off); got {threshold}")
    if floor < 0.0 or mu < 0.0:
        raise ValueError(f"floor and mu must be >= 0; got floor={floor}, mu={mu}")



def _fused_fwd_fake(seg_logits, disc_logits, *_):
    """Shapes of every fused forward (Triton's and the C++ op's): () and disc's shape, fp32."""
    return (seg_logits.new_empty((), dtype=torch.float32),
            disc_logits.new_empty(disc_logits.shape, dtype=torch.float32))


def _loss_fake(seg_logits, *_):
    return seg_logits.new_empty((), dtype=torch.float32)


# Backend "ext" is one C++ op with its autograd in C++ (csrc/weighted_adv_loss_autograd.cpp): a Python
# custom op around it cost ~110 us of host time per forward+backward. Triton's launcher is Python, so
# backend "triton" keeps a Python custom op (what torch.compile needs to trace it).
@torch.library.custom_op("pwda_fast::weighted_adv_loss_triton", mutates_args=())
def _weighted_adv_loss_triton(seg_logits: torch.Tensor, disc_logits: torch.Tensor,
                              aux_logits: torch.Tensor | None, label: float, threshold: float,
                              floor: float, mu: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused pass of the Triton kernels -> (loss () fp32, dL/dz (N, 1, h, w) fp32).

    disc_logits / aux_logits may be (N, 1, h, w) with h <= H, w <= W: the kernel samples them bilinearly
    (align_corners=True) per output pixel, and dL/dz is w.r.t. the map as passed: the adjoint of that
    upsampling is taken inside the kernels, in a fixed order (no atomics), so it is bitwise reproducible.
    """
    from pwda_fast.kernels.weighted_adv_loss import weighted_adv_loss_fwd
    return weighted_adv_loss_fwd(seg_logits, disc_logits, aux_logits, label, threshold, floor, mu)


_weighted_adv_loss_triton.register_fake(_fused_fwd_fake)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.disc_dtype = inputs[1].dtype


def _backward(ctx, grad_loss, _grad_of_grad_disc):
    # grad_disc is a by-product, not a function of the inputs anyone differentiates: its cotangent
    # is ignored. The weights are constants (docs/METHOD.md §1), so seg and aux get no gradient.
    # dL/dz stays fp32 until this one rounding to D's dtype (as in the C++ backward, which says why).
    (grad_disc,) = ctx.saved_tensors
    grad = torch.mul(grad_disc, grad_loss, out=torch.empty_like(grad_disc, dtype=ctx.disc_dtype))
    return None, grad, None, None, None, None, None


_weighted_adv_loss_triton.register_autograd(_backward, setup_context=_setup_context)

if LOSS.problem("ext", "cpu") is None:  # so the C++ ops can be traced by torch.compile
    torch.library.register_fake("pwda_fast::weighted_adv_loss_fwd", _fused_fwd_fake)
    torch.library.register_fake("pwda_fast::weighted_adv_loss", _loss_fake)
    torch.library.register_fake("pwda_fast::weighted_adv_loss_v2_fwd", _fused_fwd_fake)
    torch.library.register_fake("pwda_fast::weighted_adv_loss_v2", _loss_fake)
    torch.library.register_fake("pwda_fast::weighted_adv_loss_v2_bwd",
                                lambda grad_disc, grad_loss, dtype: grad_disc.new_empty(grad_disc.shape,
                                                                                         dtype=dtype))


def pixel_weights(seg_logits: torch.Tensor, aux_logits: torch.Tensor | None = None, *,
                  threshold: float = 0.9, floor: float = 0.01, mu: float = 0.1) -> torch.Tensor:
    """seg_logits (N, C, H, W), aux_logits (N, 1, ha, wa) or None -> weights (N, H, W) float32."""
    check_inputs(seg_logits, None, aux_logits, None, threshold, floor, mu)
    if aux_logits is not None:  # a lower-resolution D_aux map is upsampled like in weighted_adv_loss
        aux_logits = reference.upsample_to(aux_logits, seg_logits.shape[2:])
    return reference.pixel_weights(seg_logits, aux_logits, threshold=threshold, floor=floor, mu=mu)


def weighted_adv_loss(seg_logits: torch.Tensor, disc_logits: torch.Tensor,
                      aux_logits: torch.Tensor | None = None, *, label: float,
                      threshold: float = 0.9, floor: float = 0.01, mu: float = 0.1,
                      backend: str = "auto") -> torch.Tensor:
    """Mean over N*H*W of w * BCE(disc_logits, label); gradient into disc_logits only.

    seg_logits (N, C, H, W); disc_logits (N, 1, h, w), aux_logits (N, 1, ha, wa) or None -> () float32.
    Maps smaller than (H, W) are upsampled bilinearly (align_corners=True) inside the fused kernel, so
    the full-resolution maps are never materialised; the gradient reaches the low-res disc_logits.
    """
    check_inputs(seg_logits, disc_logits, aux_logits, label, threshold, floor, mu)
    backend = LOSS.resolve(backend, seg_logits.device)
    if backend == "torch":
        return reference.weighted_adv_loss(seg_logits, disc_logits, aux_logits, label=float(label),
                                           threshold=threshold, floor=floor, mu=mu)
    # The fused kernels read one dtype; mixed inputs (e.g. bf16 seg logits, fp32 D) run in fp32.
    dtypes = {t.dtype for t in (seg_logits, disc_logits, aux_logits) if t is not None}
    if len(dtypes) > 1:
        seg_logits, disc_logits = seg_logits.float(), disc_logits.float()
        aux_logits = None if aux_logits is None else aux_logits.float()
    args = (seg_logits, disc_logits, aux_logits, float(label), float(threshold), float(floor), float(mu))
    if backend == "ext":
        return torch.ops.pwda_fast.weighted_adv_loss(*args)
    if backend == "ext_v2":
        return torch.ops.pwda_fast.weighted_adv_loss_v2(*args)
    return _weighted_adv_loss_triton(*args)[0]
