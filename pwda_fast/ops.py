"""Public ops and the one place that picks a backend.

    ops.pixel_weights(seg_logits, aux_logits=None, *, threshold, floor, mu)        -> (N, H, W) fp32
    ops.weighted_adv_loss(seg_logits, disc_logits, aux_logits=None, *, label, ...,
                          backend="auto")                                           -> () fp32
    ops.available_backends()                                                        -> list[str]

Backends: "torch" (reference.py), "ext" (torch.ops.pwda_fast from csrc/), "triton" (kernels/, on
CPU only with TRITON_INTERPRET=1), "auto" (fastest available). An explicit backend that cannot run
raises with the reason; only "auto" falls back.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from pwda_fast import reference

BACKENDS = ("torch", "ext", "triton")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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
    if (t.dim() != 4 or t.shape[0] != n or t.shape[1] != 1 or not 1 <= t.shape[2] <= h
            or not 1 <= t.shape[3] <= w):
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


def _ext_problem(device_type: str) -> str | None:
    """Why backend "ext" cannot run on `device_type`, or None when it can."""
    try:
        import pwda_fast._C  # noqa: F401  (loading the .so registers torch.ops.pwda_fast.*)
    except ImportError as e:
        return ("backend 'ext' needs the compiled extension pwda_fast._C: reinstall with "
                "`pip install --no-build-isolation -e .` without PWDA_FAST_SKIP_EXT=1 "
                f"(import error: {e})")
    if device_type == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key(
            "pwda_fast::weighted_adv_loss_fwd", "CUDA"):
        return ("backend 'ext' has no CUDA kernel in this build of pwda_fast._C: reinstall with "
                "CUDA_HOME pointing at the CUDA toolkit and a CUDA build of torch")
    if device_type not in ("cpu", "cuda"):
        return f"backend 'ext' runs on cpu and cuda tensors; got {device_type}"
    return None


def _triton_problem(device_type: str) -> str | None:
    """Why backend "triton" cannot run on `device_type`, or None when it can."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"backend 'triton' needs the triton package: pip install triton (import error: {e})"
    if device_type == "cuda":
        return None
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return None
    return (f"backend 'triton' runs on cuda tensors, or on cpu tensors with TRITON_INTERPRET=1 set "
            f"before triton is imported; got {device_type} tensors")


_PROBLEMS = {"torch": lambda device_type: None, "ext": _ext_problem, "triton": _triton_problem}


def available_backends() -> list[str]:
    """Backends that can run here on some device (CPU or, when present, CUDA); "torch" always."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [b for b in BACKENDS if any(_PROBLEMS[b](d) is None for d in devices)]


# Evaluated once per (backend, device type) at trace time under torch.compile: the imports and
# environment look-ups inside would otherwise break the graph.
@torch.compiler.assume_constant_result
def _resolve(backend: str, device_type: str) -> str:
    if backend == "auto":
        prefer = ("triton", "ext") if device_type == "cuda" else ("ext",)
        return next((b for b in prefer if _PROBLEMS[b](device_type) is None), "torch")
    problem = _PROBLEMS[backend](device_type)
    if problem is not None:
        raise RuntimeError(problem)
    return backend


def resolve_backend(backend: str, device: torch.device | str = "cpu") -> str:
    """Turn "auto" into a concrete backend for `device`; an explicit one that cannot run raises."""
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}; got {backend!r}")
    return _resolve(backend, torch.device(device).type)


def _forward_of(backend: str):
    """The fused forward of `backend`: (seg, disc, aux, label, T, floor, mu) -> (loss, grad_disc)."""
    if backend == "ext":
        return torch.ops.pwda_fast.weighted_adv_loss_fwd
    from pwda_fast.kernels.weighted_adv_loss import weighted_adv_loss_fwd
    return weighted_adv_loss_fwd


@torch.library.custom_op("pwda_fast::weighted_adv_loss", mutates_args=())
def _weighted_adv_loss_op(seg_logits: torch.Tensor, disc_logits: torch.Tensor,
                          aux_logits: torch.Tensor | None, label: float, threshold: float,
                          floor: float, mu: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused pass of `backend` ("ext" or "triton") -> (loss () fp32, dL/dz_up (N, 1, H, W) fp32).

    disc_logits / aux_logits may be (N, 1, h, w) with h <= H, w <= W: the kernel samples them bilinearly
    (align_corners=True) per output pixel, and dL/dz_up is the gradient w.r.t. the upsampled map.
    """
    return _forward_of(backend)(seg_logits, disc_logits, aux_logits, label, threshold, floor, mu)


@_weighted_adv_loss_op.register_fake
def _(seg_logits, disc_logits, aux_logits, label, threshold, floor, mu, backend):
    n, _, h, w = seg_logits.shape
    return (seg_logits.new_empty((), dtype=torch.float32),
            seg_logits.new_empty((n, 1, h, w), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.disc_dtype = inputs[1].dtype
    ctx.disc_shape = tuple(inputs[1].shape)


def _backward(ctx, grad_loss, _grad_of_grad_disc):
    # grad_disc is a by-product, not a function of the inputs anyone differentiates: its cotangent
    # is ignored. The weights are constants (DESIGN.md §2), so seg and aux get no gradient.
    (grad_disc,) = ctx.saved_tensors
    grad = grad_loss * grad_disc
    if tuple(grad.shape) != ctx.disc_shape:
        # Low-resolution D map: the adjoint of the in-kernel bilinear (align_corners=True) upsampling,
        # i.e. autograd of F.interpolate (aten.upsample_bilinear2d_backward when eager; called through
        # autograd because that op's meta kernel rejects symbolic sizes under torch.compile). On CPU
        # it is deterministic (one thread per (n, c) plane); on CUDA aten accumulates with atomicAdd,
        # so the low-res gradient may differ in the last bits from run to run (the loss does not).
        with torch.enable_grad():
            low = grad.new_zeros(ctx.disc_shape).requires_grad_()
            up = F.interpolate(low, size=grad.shape[2:], mode="bilinear", align_corners=True)
            (grad,) = torch.autograd.grad(up, low, grad)
    return None, grad.to(ctx.disc_dtype), None, None, None, None, None, None


_weighted_adv_loss_op.register_autograd(_backward, setup_context=_setup_context)


def _register_ext_fake() -> None:
    """Fake kernel of the C++ op, so it can also be traced when called directly."""
    if _ext_problem("cpu") is not None:
        return

    @torch.library.register_fake("pwda_fast::weighted_adv_loss_fwd")
    def _(seg_logits, disc_logits, aux_logits, label, threshold, floor, mu):
        n, _, h, w = seg_logits.shape
        return (seg_logits.new_empty((), dtype=torch.float32),
                seg_logits.new_empty((n, 1, h, w), dtype=torch.float32))


_register_ext_fake()


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
    backend = resolve_backend(backend, seg_logits.device)
    if backend == "torch":
        return reference.weighted_adv_loss(seg_logits, disc_logits, aux_logits, label=float(label),
                                           threshold=threshold, floor=floor, mu=mu)
    # The fused kernels read one dtype; mixed inputs (e.g. bf16 seg logits, fp32 D) run in fp32.
    dtypes = {t.dtype for t in (seg_logits, disc_logits, aux_logits) if t is not None}
    if len(dtypes) > 1:
        seg_logits, disc_logits = seg_logits.float(), disc_logits.float()
        aux_logits = None if aux_logits is None else aux_logits.float()
    loss, _ = _weighted_adv_loss_op(seg_logits, disc_logits, aux_logits, float(label), float(threshold),
                                    float(floor), float(mu), backend)
    return loss
