"""Public ops and the one place that picks a backend.

    ops.pixel_weights(seg_logits, aux_logits=None, *, threshold, floor, mu)        -> (N, H, W) fp32
    ops.weighted_adv_loss(seg_logits, disc_logits, aux_logits=None, *, label, ...,
                          backend="auto")                                           -> () fp32
    ops.available_backends()                                                        -> list[str]
    ops.backend_problem(backend, device_type)                                       -> str | None
    ops.upsample_leaky_relu(x, size, *, slope=0.2, backend="auto")                   -> (N, C, *size)
    ops.resolve_upsample_backend(backend, device)                                   -> "torch" | "triton"
    ops.FirstCall(backend, what)(lambda backend: ...)                               -> a fused op, or torch

Backends: "torch" (reference.py), "ext" (torch.ops.pwda_fast from csrc/), "ext_v2" (the second CUDA
kernel, csrc/cuda/weighted_adv_loss_v2.cu: CUDA only, opt-in until a GPU run has shown it correct and
faster), "triton" (kernels/, on CPU only with TRITON_INTERPRET=1), "auto" (fastest available). An
explicit backend that cannot run raises with the reason; only "auto" falls back. upsample_leaky_relu
has "torch" and "triton" only; its "auto" is "triton" on CUDA where Triton runs, else "torch".
Training calls the fused ops through FirstCall: a kernel that fails to compile or launch on its first
call falls back to "torch" with a warning instead of ending the run.
"""

from __future__ import annotations

import os
import warnings

import torch

from pwda_fast import reference

BACKENDS = ("torch", "ext", "ext_v2", "triton")
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
                "nvcc on PATH (or CUDA_HOME set) and a CUDA build of torch")
    if device_type not in ("cpu", "cuda"):
        return f"backend 'ext' runs on cpu and cuda tensors; got {device_type}"
    return None


def _ext_v2_problem(device_type: str) -> str | None:
    """Why backend "ext_v2" cannot run on `device_type`, or None when it can: CUDA tensors only."""
    if device_type != "cuda":
        return f"backend 'ext_v2' is a CUDA kernel only; got {device_type} tensors (use 'ext' there)"
    problem = _ext_problem(device_type)
    if problem is None and not torch._C._dispatch_has_kernel_for_dispatch_key(
            "pwda_fast::weighted_adv_loss_v2_fwd", "CUDA"):
        problem = ("backend 'ext_v2' has no CUDA kernel in this build of pwda_fast._C: reinstall with "
                   "nvcc on PATH (or CUDA_HOME set) and a CUDA build of torch")
    return problem and problem.replace("backend 'ext'", "backend 'ext_v2'")


def _triton_problem(device_type: str) -> str | None:
    """Why backend "triton" cannot run on `device_type`, or None when it can."""
    # The kernel module itself, not just triton: a tree where pwda_fast.kernels cannot be found, or a
    # triton whose API the kernels do not match, must fall back under "auto", not crash at the first call.
    try:
        import pwda_fast.kernels.weighted_adv_loss  # noqa: F401
    except Exception as e:  # any import-time failure, not only ImportError, means "cannot run here"
        return (f"backend 'triton' cannot import its kernels pwda_fast.kernels.weighted_adv_loss "
                f"({type(e).__name__}: {e}); install triton (pip install triton) and the package")
    if device_type == "cuda":
        return None
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return None
    return (f"backend 'triton' runs on cuda tensors, or on cpu tensors with TRITON_INTERPRET=1 set "
            f"before triton is imported; got {device_type} tensors")


def backend_problem(backend: str, device_type: str) -> str | None:
    """Why `backend` (BACKENDS) cannot run on `device_type` ("cpu", "cuda") tensors, or None when it
    can. The message says what to do."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if backend == "torch":
        return None
    return {"ext": _ext_problem, "ext_v2": _ext_v2_problem, "triton": _triton_problem}[backend](device_type)


def available_backends() -> list[str]:
    """Backends that can run here on some device (CPU or, when present, CUDA); "torch" always."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [b for b in BACKENDS if any(backend_problem(b, d) is None for d in devices)]


# Evaluated once per (backend, device type) at trace time under torch.compile: the imports and
# environment look-ups inside would otherwise break the graph.
@torch.compiler.assume_constant_result
def _resolve(backend: str, device_type: str) -> str:
    if backend == "auto":
        # ext first on CUDA too: on an H200 (BENCHMARKS.md, 2026-12-04) its fwd+bwd kernels take
        # 141 us against Triton's 167 us at 4x19x512x1024 bf16, and its autograd is C++.
        prefer = ("ext", "triton") if device_type == "cuda" else ("ext",)
        return next((b for b in prefer if backend_problem(b, device_type) is None), "torch")
    problem = backend_problem(backend, device_type)
    if problem is not None:
        raise RuntimeError(problem)
    return backend


def resolve_backend(backend: str, device: torch.device | str = "cpu") -> str:
    """Turn "auto" into a concrete backend for `device`; an explicit one that cannot run raises."""
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}; got {backend!r}")
    return _resolve(backend, torch.device(device).type)


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

if _ext_problem("cpu") is None:  # so the C++ ops can be traced by torch.compile
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
    backend = resolve_backend(backend, seg_logits.device)
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


class FirstCall:
    """A resolved backend as training uses it: `guard(lambda backend: op(..., backend=backend), grad_of)`.

    The first call with a fused backend is tried, forward and (once, for the tensors of `grad_of` that
    need a gradient) backward; if either raises (a Triton compile error, a CUDA "no kernel image is
    available" for this GPU, a missing kernel), the op is called again with "torch", one warning names
    the op and the error, and every later call uses "torch": a kernel that has never run on this
    machine costs a warning, not the run. Bad inputs (ValueError) and out-of-memory are not the
    backend's fault and propagate; so does any failure after the first call.
    """

    def __init__(self, backend: str, what: str, warn=warnings.warn):
        self.backend, self.what, self.warn = backend, what, warn
        self.proven = backend == "torch"

    def __call__(self, call, grad_of=()):
        if self.proven:
            return call(self.backend)
        try:
            out = call(self.backend)
            wrt = [t for t in grad_of if t.requires_grad]
            if wrt and out.requires_grad:  # the backward kernels too, before the real backward needs them
                torch.autograd.grad(out.float().sum(), wrt, retain_graph=True)
        except (ValueError, torch.cuda.OutOfMemoryError):
            raise
        except Exception as e:  # compilers and drivers raise many types
            self.warn(f"{self.what}: backend {self.backend!r} failed on its first call "
                      f"({type(e).__name__}: {str(e).strip()[:500]}); going on with backend 'torch'")
            self.backend, self.proven = "torch", True
            return call("torch")
        self.proven = True
        return out


def _upsample_problem(backend: str, device_type: str) -> str | None:
    if backend == "torch":
        return None
    try:
        import pwda_fast.kernels.upsample_leaky_relu  # noqa: F401
    except Exception as e:  # as for the loss: any import-time failure means "cannot run here"
        return (f"upsample backend 'triton' cannot import pwda_fast.kernels.upsample_leaky_relu "
                f"({type(e).__name__}: {e}); install triton (pip install triton) and the package")
    return _triton_problem(device_type)


def resolve_upsample_backend(backend: str, device: torch.device | str = "cpu") -> str:
    """kernels.upsample ("auto", "torch", "triton") -> the backend upsample_leaky_relu runs on `device`;
    "auto" is "triton" on CUDA where it can run, else "torch"; an explicit one that cannot run raises."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"upsample backend must be one of ('auto', 'torch', 'triton'); got {backend!r}")
    device_type = torch.device(device).type
    if backend == "auto":
        return "triton" if device_type == "cuda" and _upsample_problem("triton", "cuda") is None else "torch"
    problem = _upsample_problem(backend, device_type)
    if problem is not None:
        raise RuntimeError(problem)
    return backend


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
    if resolve_upsample_backend(backend, x.device) == "torch":
        return reference.upsample_leaky_relu(x, (height, width), slope)
    return _upsample_leaky_relu_triton(x, height, width, float(slope))
