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

import torch

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
    if t.dim() != 4 or t.shape[0] != n or t.shape[1] != 1 or tuple(t.shape[2:]) != (h, w):
        raise ValueError(f"{name} must be (N, 1, H, W) like seg_logits {tuple(like.shape)}, "
                         f"i.e. ({n}, 1, {h}, {w}); got {tuple(t.shape)}")
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


def available_backends() -> list[str]:
    """Backends that can run here, fastest last-resort order excluded: always includes "torch"."""
    return ["torch"]


def resolve_backend(backend: str, device: torch.device | str = "cpu") -> str:
    """Turn "auto" into a concrete backend for `device`; an explicit one that cannot run raises."""
    if backend == "auto":
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}; got {backend!r}")
    if backend != "torch":
        raise RuntimeError(f"backend {backend!r} is not available in this build")
    return backend


def pixel_weights(seg_logits: torch.Tensor, aux_logits: torch.Tensor | None = None, *,
                  threshold: float = 0.9, floor: float = 0.01, mu: float = 0.1) -> torch.Tensor:
    """seg_logits (N, C, H, W), aux_logits (N, 1, H, W) or None -> weights (N, H, W) float32."""
    check_inputs(seg_logits, None, aux_logits, None, threshold, floor, mu)
    return reference.pixel_weights(seg_logits, aux_logits, threshold=threshold, floor=floor, mu=mu)


def weighted_adv_loss(seg_logits: torch.Tensor, disc_logits: torch.Tensor,
                      aux_logits: torch.Tensor | None = None, *, label: float,
                      threshold: float = 0.9, floor: float = 0.01, mu: float = 0.1,
                      backend: str = "auto") -> torch.Tensor:
    """Mean over N*H*W of w * BCE(disc_logits, label); gradient into disc_logits only.

    seg_logits (N, C, H, W); disc_logits, aux_logits (N, 1, H, W) -> () float32.
    """
    check_inputs(seg_logits, disc_logits, aux_logits, label, threshold, floor, mu)
    backend = resolve_backend(backend, seg_logits.device)
    return reference.weighted_adv_loss(seg_logits, disc_logits, aux_logits, label=float(label),
                                       threshold=threshold, floor=floor, mu=mu)
